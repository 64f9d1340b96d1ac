// Spool: the sink's on-disk journal of one epoch, written with io_uring.
//
// An epoch arrives as frames (engine/format/frame.h). The sink appends each
// verified frame to the epoch's spool file, and acknowledges the epoch to
// the source only after Sync() returned: the bytes are on stable storage.
// Apply then replays the spool onto the standby image; after a crash the
// spool is re-opened, its verified prefix kept, and a complete epoch is
// applied again (writes are idempotent).
//
// File layout (docs/FORMAT.md):
//   [0, 4096)   spool header: magic "CAIRNSPL", version, XXH3-64 of the
//               header, volume id and epoch seq (for a clear error when a
//               file lands in the wrong place)
//   [4096, ...) frames, back to back, exactly as on the wire; after the
//               last frame, zeros up to the next 4 KiB boundary (O_DIRECT
//               writes whole aligned blocks). A zero magic ends the data.
//
// Writes go through io_uring with registered, 4 KiB-aligned staging
// buffers and O_DIRECT; Sync() links an fdatasync after the last write.
// Where the file system refuses O_DIRECT (tmpfs), it falls back to
// buffered writes + fdatasync, and says so once in the log.
//
// Memory: two staging buffers of SpoolOptions::buffer_bytes each, whatever
// the epoch size.
//
// Thread-safety: a SpoolWriter or SpoolReader is used by one thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "engine/base/status.h"
#include "engine/format/frame.h"

namespace cairn {

inline constexpr size_t kSpoolHeaderSize = 4096;
inline constexpr uint32_t kSpoolVersion = 1;

struct SpoolOptions {
  size_t buffer_bytes = 4u << 20;  // per staging buffer; multiple of 4096
  bool direct_io = true;           // O_DIRECT; falls back if refused
  // Largest spool file, header and padding included; 0: no limit. An
  // Append that would pass it is refused with kResourceExhausted "spool
  // quota exceeded" and leaves the writer usable (Sync still works).
  uint64_t max_bytes = 0;
};

struct SpoolIdentity {
  std::string volume;
  uint64_t seq = 0;
};

class SpoolWriter {
 public:
  // Creates (or truncates) `path` and writes its header.
  // kResourceExhausted ("spool disk full: ...") if the disk is full;
  // kFailedPrecondition if the directory is missing or not writable.
  static StatusOr<std::unique_ptr<SpoolWriter>> Create(const std::filesystem::path& path,
                                                       const SpoolIdentity& id,
                                                       const SpoolOptions& options = {});
  // Re-opens an existing spool to append after its first `logical_end`
  // bytes of frame data: the end of its last whole, verified frame (see
  // SpoolReader::offset()). Whatever the file holds after that is
  // discarded. The header is not rewritten: the caller has checked it.
  static StatusOr<std::unique_ptr<SpoolWriter>> Resume(const std::filesystem::path& path,
                                                       uint64_t logical_end,
                                                       const SpoolOptions& options = {});
  virtual ~SpoolWriter() = default;

  // Appends one frame: `header` (32 bytes), `body`, `payload`. The bytes
  // are copied into a staging buffer; full buffers are written
  // asynchronously. Not durable until Sync() returns.
  virtual Status Append(std::span<const char> header, std::string_view body,
                        std::span<const char> payload) = 0;

  // Writes all appended frames and fdatasyncs. On success every frame
  // appended so far is durable. Returns the logical length of frame data
  // (bytes after the spool header).
  virtual StatusOr<uint64_t> Sync() = 0;

  // After a failed Append or Sync (a full disk): waits for the writes in
  // flight and fdatasyncs, so that whatever reached the file is durable.
  // Which frames are whole is then known only by reading the file back
  // (SpoolReader); a short or failed write leaves at most a torn tail,
  // never a gap before data that reads as frames. The writer stays failed.
  virtual Status SyncWritten() = 0;

  // Bytes of frame data appended so far (durable or not).
  virtual uint64_t appended() const = 0;
};

// Reads the frames of a spool file in order. Open checks the spool
// header (magic, version, checksum, identity). Next() returns the frames
// one by one with their bodies verified; kAborted "end of spool" after the
// last whole frame; kDataLoss for a torn or corrupt frame (with its
// offset).
class SpoolReader {
 public:
  // `expect`: if its volume is non-empty, the file must be for that volume
  // and seq, else kDataLoss "spool belongs to ...".
  static StatusOr<std::unique_ptr<SpoolReader>> Open(const std::filesystem::path& path,
                                                     const SpoolIdentity& expect);
  virtual ~SpoolReader() = default;
  virtual const SpoolIdentity& identity() const = 0;
  virtual StatusOr<Frame> Next() = 0;
  // Offset of the next frame, relative to the end of the spool header.
  virtual uint64_t offset() const = 0;
};

}  // namespace cairn
