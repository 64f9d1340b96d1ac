// SpoolStore: the sink's spool directory as the engine sees it, the Spool
// seam. One spool per (volume, epoch seq), in the format spool.h describes.
//
// Implementations:
//   - FileSpoolStore (file_spool_store.h): files <dir>/<volume>/<seq>.spool
//     written with io_uring and O_DIRECT (the daemon's, from [sink]
//     spool_dir);
//   - MemorySpoolStore (memory_spool_store.h): the same bytes in memory,
//     with the same durability: what was appended but not synced is lost
//     by a simulated crash (DropUnsynced);
//   - FaultSpoolStore (fault_spool_store.h): stacks on either and fails or
//     tears chosen operations.
//
// Every implementation names a spool in its messages as the path
// <dir>/<volume>/<seq>.spool (where() is <dir>), so errors read the same
// whichever store produced them.
//
// Thread-safety: a SpoolStore is thread-safe; the writers and readers it
// returns are used by one thread at a time (spool.h). Writers and readers
// do not keep the store alive: the store must outlive them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/spool/spool.h"

namespace cairn {

class SpoolStore {
 public:
  virtual ~SpoolStore() = default;

  // Makes the place of `volume`'s spools if it is missing (FileSpoolStore:
  // <dir>/<volume>). kFailedPrecondition "cannot create spool directory
  // DIR: WHY" if it cannot be made. Cost: a mkdir, no write or sync.
  virtual Status AddVolume(const std::string& volume) = 0;

  // Starts the spool of epoch `seq` of `volume`, replacing any spool of
  // that epoch, and writes its header. The volume's place in the store is
  // made if missing (as AddVolume). Nothing is durable until the writer's first Sync.
  // Failure: kInvalidArgument for bad options or a volume name over 256
  // bytes; kResourceExhausted "spool disk full: ..." (Reason
  // kSpoolDiskFull); kFailedPrecondition when an operator must act ("cannot
  // create spool directory ...", "spool directory not writable: ...").
  // Cost: one 4 KiB write (and the volume's directory, the first time).
  virtual StatusOr<std::unique_ptr<SpoolWriter>> Create(const std::string& volume, uint64_t seq,
                                                        const SpoolOptions& options) = 0;

  // Re-opens the spool of epoch `seq` to append after its first
  // `logical_end` bytes of frame data (SpoolReader::offset() after its last
  // verified frame); what follows is discarded. The header is not checked
  // or rewritten. Failure: kFailedPrecondition "spool directory missing"
  // if there is no such spool; kDataLoss if the spool is shorter than
  // `logical_end`; else as Create. Cost: at most one 4 KiB read.
  virtual StatusOr<std::unique_ptr<SpoolWriter>> Resume(const std::string& volume, uint64_t seq,
                                                        uint64_t logical_end,
                                                        const SpoolOptions& options) = 0;

  // Reads the spool of epoch `seq`; its header must name `volume` and
  // `seq`. Failure: kNotFound "opening spool PATH: No such file or
  // directory (errno 2)"; kDataLoss for a header that is not a spool's, is
  // corrupt or names another epoch ("spool belongs to ..."). Cost: one 4
  // KiB read.
  virtual StatusOr<std::unique_ptr<SpoolReader>> Open(const std::string& volume, uint64_t seq) = 0;

  // The seqs (> 0) that have a spool of `volume`, ascending; empty if the
  // volume has none or no place in the store. Names that are not
  // "<seq>.spool" are not spools. Cost: a directory listing.
  virtual StatusOr<std::vector<uint64_t>> List(const std::string& volume) = 0;

  // The volumes that have at least one spool (as List counts them),
  // ascending. Cost: a listing of the store and of each volume's spools.
  virtual StatusOr<std::vector<std::string>> Volumes() = 0;

  // Removes the spool of epoch `seq`, if there is one (OK if not).
  // Writers and readers still open on it keep working on what they had.
  virtual Status Remove(const std::string& volume, uint64_t seq) = 0;

  // Bytes that may still be written to the store (0 if unknown).
  virtual uint64_t FreeBytes() = 0;

  // Whether spools of `volume` can be written ("" for the store itself):
  // its place is made if missing and a 4 KiB block written, synced and
  // removed. kFailedPrecondition saying what is wrong otherwise. Cost: one
  // synced 4 KiB write.
  virtual Status CheckWritable(const std::string& volume) = 0;

  // Where the spools are, for messages (FileSpoolStore: its directory).
  virtual std::string where() const = 0;
};

}  // namespace cairn
