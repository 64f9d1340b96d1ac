// The spool reader: frames read back through a bounded buffer (see spool.h).

#include <fcntl.h>
#include <fmt/format.h>
#include <liburing.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "engine/spool/spool.h"
#include "engine/spool/spool_file.h"

namespace cairn {

using namespace spool_internal;  // the file's layout (spool_file.h)

namespace {

// A ByteSource over a file from a start offset, through a bounded buffer.
// Reads larger than the buffer go straight to the caller's memory.
class FileSource final : public ByteSource {
 public:
  FileSource(const SpoolReadAt& read_at, uint64_t start)
      : read_at_(read_at),
        read_off_(start),
        position_(start),
        buf_(std::make_unique_for_overwrite<char[]>(kReadBufferBytes)) {}

  Status ReadExact(std::span<char> out) override;

  // Up to `n` (<= buffer size) bytes at the current position, not consumed;
  // fewer only at end of file.
  StatusOr<std::span<const char>> Peek(size_t n);

  // File offset of the next unconsumed byte.
  uint64_t position() const { return position_; }

 private:
  // Reads more into the buffer at end_; returns the byte count (0 at EOF).
  StatusOr<size_t> FillSome();

  const SpoolReadAt& read_at_;  // owned by the reader
  uint64_t read_off_;           // file offset of buf_[end_]
  uint64_t position_;           // file offset of buf_[begin_]
  std::unique_ptr<char[]> buf_;
  size_t begin_ = 0;
  size_t end_ = 0;
};

StatusOr<size_t> FileSource::FillSome() {
  ASSIGN_OR_RETURN(size_t n, read_at_(buf_.get() + end_, kReadBufferBytes - end_, read_off_));
  end_ += n;
  read_off_ += n;
  return n;
}

StatusOr<std::span<const char>> FileSource::Peek(size_t n) {
  assert(n <= kReadBufferBytes);
  if (end_ - begin_ < n && begin_ + n > kReadBufferBytes) {
    std::memmove(buf_.get(), buf_.get() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (end_ - begin_ < n) {
    ASSIGN_OR_RETURN(size_t got, FillSome());
    (void)got;  // PreadFull stops short only at EOF
  }
  return std::span<const char>(buf_.get() + begin_, std::min(n, end_ - begin_));
}

Status FileSource::ReadExact(std::span<char> out) {
  if (out.empty()) return OkStatus();
  size_t got = 0;
  while (got < out.size()) {
    if (begin_ == end_) {
      begin_ = end_ = 0;
      const size_t want = out.size() - got;
      size_t n = 0;
      if (want >= kReadBufferBytes) {
        ASSIGN_OR_RETURN(n, read_at_(out.data() + got, want, read_off_));
        read_off_ += n;
        position_ += n;
        got += n;
      } else {
        ASSIGN_OR_RETURN(n, FillSome());
      }
      if (n == 0 || got == out.size()) break;
      continue;
    }
    const size_t k = std::min(end_ - begin_, out.size() - got);
    std::memcpy(out.data() + got, buf_.get() + begin_, k);
    begin_ += k;
    position_ += k;
    got += k;
  }
  if (got == out.size()) return OkStatus();
  if (got == 0) return Aborted("end of stream");
  return DataLoss(fmt::format("truncated frame: wanted {} bytes, {} left", out.size(), got));
}

class FileSpoolReader final : public SpoolReader {
 public:
  FileSpoolReader(SpoolReadAt read_at, SpoolIdentity id)
      : read_at_(std::move(read_at)), id_(std::move(id)), src_(read_at_, kSpoolHeaderSize) {}
  FileSpoolReader(const FileSpoolReader&) = delete;
  FileSpoolReader& operator=(const FileSpoolReader&) = delete;

  const SpoolIdentity& identity() const override { return id_; }
  StatusOr<Frame> Next() override;
  uint64_t offset() const override { return offset_; }

 private:
  const SpoolReadAt read_at_;
  const SpoolIdentity id_;
  FileSource src_;
  uint64_t offset_ = 0;
  Status final_;  // end of spool or the first error; returned from then on
};

StatusOr<Frame> FileSpoolReader::Next() {
  if (!final_.ok()) return final_;
  auto at_frame = [this](const Status& st) {
    final_ = st.code() == Code::kDataLoss
                 ? st.Annotate(fmt::format("torn or corrupt frame at spool offset {}", offset_))
                 : st.Annotate(fmt::format("frame at spool offset {}", offset_));
    return final_;
  };
  StatusOr<std::span<const char>> head = src_.Peek(kFrameHeaderSize);
  if (!head.ok()) return at_frame(head.status());
  // The writer pads with zeros to a block boundary: zeros up to EOF, or a
  // whole zero frame header, end the data. Anything else must be a frame.
  if (std::all_of(head->begin(), head->end(), [](char c) { return c == 0; })) {
    final_ = Aborted("end of spool");
    return final_;
  }
  StatusOr<Frame> f = ReadFrame(src_);
  if (!f.ok()) return at_frame(f.status());
  offset_ = src_.position() - kSpoolHeaderSize;
  return f;
}

}  // namespace

StatusOr<std::unique_ptr<SpoolReader>> spool_internal::OpenSpoolBytes(
    SpoolReadAt read_at, const std::filesystem::path& path, const SpoolIdentity& expect) {
  char block[kSpoolHeaderSize];
  StatusOr<size_t> n = read_at(block, sizeof block, 0);
  StatusOr<SpoolIdentity> id =
      n.ok() ? DecodeSpoolHeader(block, *n, path) : StatusOr<SpoolIdentity>(n.status());
  if (id.ok() && !expect.volume.empty() && (id->volume != expect.volume || id->seq != expect.seq)) {
    id = DataLoss(fmt::format("spool belongs to volume {} epoch {}, expected {} epoch {}",
                              id->volume, id->seq, expect.volume, expect.seq));
  }
  if (!id.ok()) return id.status();
  return std::unique_ptr<SpoolReader>(
      new FileSpoolReader(std::move(read_at), std::move(id).value()));
}

StatusOr<std::unique_ptr<SpoolReader>> SpoolReader::Open(const std::filesystem::path& path,
                                                         const SpoolIdentity& expect) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return SpoolErrno(errno, fmt::format("opening spool {}", path.string()));
  // The descriptor lives as long as the reader's read function.
  auto closer = std::shared_ptr<void>(nullptr, [fd](void*) { ::close(fd); });
  SpoolReadAt read_at = [fd, path, closer](char* out, size_t n, uint64_t off) {
    return PreadFull(fd, out, n, off, path);
  };
  return OpenSpoolBytes(std::move(read_at), path, expect);
}

}  // namespace cairn
