// The spool writer over io_uring (see spool.h).
//
// Writer. The logical stream is the file itself: header block, then frames.
// kBuffers staging buffers take turns; buffer `cur_` holds the bytes of
// the file from `buf_file_off_` (4 KiB-aligned) on. A full buffer is
// written asynchronously and the next one becomes current (after its own
// previous write has completed): up to kBuffers - 1 writes are in flight.
// Sync() writes the partial current buffer padded with zeros to a 4 KiB
// boundary, linked to an fdatasync; afterwards the partial last block stays
// at the front of the buffer, so the next write rewrites that block with the
// frames that follow. Invariant:
//   buf_file_off_ + fill_ == kSpoolHeaderSize + appended_.

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

class UringSpoolWriter final : public SpoolWriter {
 public:
  UringSpoolWriter(std::filesystem::path path, size_t buffer_bytes, uint64_t max_bytes)
      : path_(std::move(path)), buffer_bytes_(buffer_bytes), max_bytes_(max_bytes) {}
  ~UringSpoolWriter() override;
  UringSpoolWriter(const UringSpoolWriter&) = delete;
  UringSpoolWriter& operator=(const UringSpoolWriter&) = delete;

  // Opens the file, sets up the ring and buffers, writes the header block.
  Status Init(const SpoolIdentity& id, bool direct_io);
  // Opens an existing file and positions the writer after `logical_end`
  // bytes of frame data, with the partial last block loaded.
  Status InitResume(uint64_t logical_end, bool direct_io);

  Status Append(std::span<const char> header, std::string_view body,
                std::span<const char> payload) override;
  StatusOr<uint64_t> Sync() override;
  Status SyncWritten() override;
  uint64_t appended() const override { return appended_; }

 private:
  // user_data of each operation; at most one of each is in flight: the
  // write of staging buffer i is Op i.
  enum Op : int { kWriteBuf0 = 0, kFsync = kBuffers, kNumOps = kBuffers + 1 };
  struct InFlight {
    bool busy = false;
    uint32_t len = 0;
    uint64_t off = 0;
  };

  Status Open(bool direct_io, bool truncate = true);
  Status SetUpRing();
  Status Copy(const char* p, size_t n);
  Status RotateBuffer();
  void PrepWrite(int buf, size_t len, uint64_t file_off, unsigned sqe_flags);
  void PrepFsync();
  Status Submit(std::initializer_list<Op> ops);
  Status WaitFor(Op op);
  void Complete(uint64_t user_data, int res);
  Status SyncDirectory();
  // Records the first error: after it the writer only returns it.
  void SetError(Status st) {
    if (error_.ok()) error_ = std::move(st);
  }
  Status Fail(Status st) {
    SetError(std::move(st));
    return error_;
  }

  const std::filesystem::path path_;
  const size_t buffer_bytes_;
  const uint64_t max_bytes_;  // 0: no limit
  int fd_ = -1;
  bool ring_ready_ = false;
  bool buffers_registered_ = false;
  io_uring ring_{};
  char* buf_[kBuffers] = {};
  InFlight inflight_[kNumOps];
  bool fsync_canceled_ = false;
  int cur_ = 0;                // staging buffer being filled
  size_t fill_ = 0;            // bytes in buf_[cur_]
  uint64_t buf_file_off_ = 0;  // file offset of buf_[cur_][0]
  uint64_t appended_ = 0;
  bool dir_synced_ = false;
  Status error_;
};

UringSpoolWriter::~UringSpoolWriter() {
  if (ring_ready_) {
    // The kernel may still be reading the staging buffers.
    for (int op = 0; op < kNumOps; ++op) {
      while (inflight_[op].busy) {
        io_uring_cqe* cqe = nullptr;
        const int r = io_uring_wait_cqe(&ring_, &cqe);
        if (r == -EINTR) continue;
        if (r < 0) break;
        Complete(cqe->user_data, cqe->res);
        io_uring_cqe_seen(&ring_, cqe);
      }
    }
    if (buffers_registered_) io_uring_unregister_buffers(&ring_);
    io_uring_queue_exit(&ring_);
  }
  if (fd_ >= 0) ::close(fd_);
  for (char* b : buf_) std::free(b);
}

Status UringSpoolWriter::Open(bool direct_io, bool truncate) {
  const int flags = truncate ? O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC : O_RDWR | O_CLOEXEC;
  const std::string what =
      fmt::format("{} spool {}", truncate ? "creating" : "re-opening", path_.string());
  fd_ = ::open(path_.c_str(), direct_io ? flags | O_DIRECT : flags, 0640);
  if (fd_ < 0 && direct_io && errno == EINVAL) {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      spdlog::warn(
          "spool: the file system of {} refuses O_DIRECT; using buffered writes + fdatasync "
          "(logged once)",
          DirOf(path_));
    }
    fd_ = ::open(path_.c_str(), flags, 0640);
  }
  if (fd_ >= 0) return OkStatus();
  const int e = errno;
  switch (e) {
    case ENOENT:
    case ENOTDIR:
      return FailedPrecondition(fmt::format("spool directory missing: {} ({}: {})", DirOf(path_),
                                            what, std::strerror(e)));
    case EACCES:
    case EPERM:
    case EROFS:
      return FailedPrecondition(fmt::format("spool directory not writable: {} ({}: {})",
                                            DirOf(path_), what, std::strerror(e)));
    default:
      return SpoolErrno(e, what);
  }
}

Status UringSpoolWriter::Init(const SpoolIdentity& id, bool direct_io) {
  RETURN_IF_ERROR(Open(direct_io));
  RETURN_IF_ERROR(SetUpRing());
  EncodeSpoolHeader(id, buf_[0]);
  PrepWrite(0, kSpoolHeaderSize, 0, 0);
  RETURN_IF_ERROR(Submit({kWriteBuf0}));
  RETURN_IF_ERROR(WaitFor(kWriteBuf0));
  cur_ = 0;
  fill_ = 0;
  buf_file_off_ = kSpoolHeaderSize;
  return OkStatus();
}

Status UringSpoolWriter::InitResume(uint64_t logical_end, bool direct_io) {
  RETURN_IF_ERROR(Open(direct_io, /*truncate=*/false));
  RETURN_IF_ERROR(SetUpRing());
  const uint64_t end = kSpoolHeaderSize + logical_end;
  buf_file_off_ = end / kAlign * kAlign;
  fill_ = end - buf_file_off_;
  appended_ = logical_end;
  cur_ = 0;
  if (fill_ > 0) {
    // The partial last block is rewritten by the next Sync: load it.
    auto n = PreadFull(fd_, buf_[0], kAlign, buf_file_off_, path_);
    if (!n.ok()) return n.status();
    if (*n < fill_) {
      return DataLoss(
          fmt::format("spool {} is shorter than its resume point {}", path_.string(), logical_end));
    }
  }
  // Nothing after the resume point may survive to be read as frames.
  if (::ftruncate(fd_, static_cast<off_t>(RoundUp(end, kAlign))) != 0) {
    return SpoolErrno(errno, fmt::format("truncating spool {}", path_.string()));
  }
  return OkStatus();
}

Status UringSpoolWriter::SetUpRing() {
  for (char*& b : buf_) {
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, buffer_bytes_) != 0) {
      return ResourceExhausted(
          fmt::format("cannot allocate spool staging buffers of {} bytes", buffer_bytes_));
    }
    b = static_cast<char*>(p);
  }
  int r = io_uring_queue_init(kRingDepth, &ring_, 0);
  if (r < 0) {
    if (r == -ENOMEM) return ResourceExhausted("io_uring_queue_init: out of memory");
    if (r == -EPERM || r == -ENOSYS) {
      return FailedPrecondition(fmt::format(
          "io_uring is disabled on this host ({}): check kernel.io_uring_disabled and the "
          "container's seccomp profile",
          std::strerror(-r)));
    }
    return ErrnoStatus(r, "io_uring_queue_init");
  }
  ring_ready_ = true;
  iovec iov[kBuffers];
  for (int i = 0; i < kBuffers; ++i) iov[i] = {buf_[i], buffer_bytes_};
  r = io_uring_register_buffers(&ring_, iov, kBuffers);
  if (r == 0) {
    buffers_registered_ = true;
  } else {
    // Old kernels count registered buffers against RLIMIT_MEMLOCK. Plain
    // writes from the same buffers work, at the cost of pinning per write.
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      spdlog::warn(
          "spool: cannot register io_uring buffers ({}); using unregistered writes "
          "(logged once)",
          std::strerror(-r));
    }
  }

  return OkStatus();
}

void UringSpoolWriter::PrepWrite(int buf, size_t len, uint64_t file_off, unsigned sqe_flags) {
  assert(len % kAlign == 0 && file_off % kAlign == 0 && len <= buffer_bytes_);
  assert(!inflight_[buf].busy);
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  assert(sqe != nullptr && "the ring has room for every operation that can be in flight");
  if (buffers_registered_) {
    io_uring_prep_write_fixed(sqe, fd_, buf_[buf], static_cast<unsigned>(len), file_off, buf);
  } else {
    io_uring_prep_write(sqe, fd_, buf_[buf], static_cast<unsigned>(len), file_off);
  }
  io_uring_sqe_set_flags(sqe, sqe_flags);
  io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(buf));
  inflight_[buf] = InFlight{true, static_cast<uint32_t>(len), file_off};
}

void UringSpoolWriter::PrepFsync() {
  assert(!inflight_[kFsync].busy);
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  assert(sqe != nullptr);
  io_uring_prep_fsync(sqe, fd_, IORING_FSYNC_DATASYNC);
  io_uring_sqe_set_data64(sqe, kFsync);
  inflight_[kFsync] = InFlight{true, 0, 0};
}

Status UringSpoolWriter::Submit(std::initializer_list<Op> ops) {
  size_t submitted = 0;
  while (submitted < ops.size()) {
    const int r = io_uring_submit(&ring_);
    if (r == -EINTR) continue;
    if (r <= 0) {
      // What was not submitted will never complete: do not wait for it.
      for (auto it = ops.begin() + submitted; it != ops.end(); ++it) inflight_[*it].busy = false;
      return Fail(ErrnoStatus(r < 0 ? r : -EAGAIN,
                              fmt::format("io_uring_submit for spool {}", path_.string())));
    }
    submitted += static_cast<size_t>(r);
  }
  return OkStatus();
}

void UringSpoolWriter::Complete(uint64_t user_data, int res) {
  assert(user_data < kNumOps);
  InFlight& op = inflight_[user_data];
  op.busy = false;
  if (user_data == kFsync) {
    if (res == -ECANCELED) {
      fsync_canceled_ = true;  // the linked write failed; its error is the one to report
    } else if (res < 0) {
      SetError(SpoolErrno(-res, fmt::format("fdatasync of spool {}", path_.string())));
    }
    return;
  }
  const std::string what = fmt::format("writing spool {} at offset {}", path_.string(), op.off);
  if (res < 0) {
    SetError(SpoolErrno(-res, what));
  } else if (static_cast<uint32_t>(res) != op.len) {
    // A regular file writes short only when it cannot grow: out of space
    // (or over RLIMIT_FSIZE).
    SetError(ResourceExhausted(
                 fmt::format("spool disk full: {}: short write, {} of {} bytes", what, res, op.len))
                 .WithReason(Reason::kSpoolDiskFull));
  }
}

Status UringSpoolWriter::WaitFor(Op op) {
  while (inflight_[op].busy) {
    io_uring_cqe* cqe = nullptr;
    const int r = io_uring_wait_cqe(&ring_, &cqe);
    if (r == -EINTR) continue;
    if (r < 0) return Fail(ErrnoStatus(r, "io_uring_wait_cqe"));
    Complete(cqe->user_data, cqe->res);
    io_uring_cqe_seen(&ring_, cqe);
  }
  return error_;
}

Status UringSpoolWriter::RotateBuffer() {
  assert(fill_ == buffer_bytes_);
  PrepWrite(cur_, buffer_bytes_, buf_file_off_, 0);
  RETURN_IF_ERROR(Submit({static_cast<Op>(cur_)}));
  cur_ = (cur_ + 1) % kBuffers;
  buf_file_off_ += buffer_bytes_;
  fill_ = 0;
  // The new current buffer may still be on its way to disk.
  return WaitFor(static_cast<Op>(cur_));
}

Status UringSpoolWriter::Copy(const char* p, size_t n) {
  while (n > 0) {
    const size_t k = std::min(n, buffer_bytes_ - fill_);
    std::memcpy(buf_[cur_] + fill_, p, k);
    fill_ += k;
    appended_ += k;
    p += k;
    n -= k;
    if (fill_ == buffer_bytes_) RETURN_IF_ERROR(RotateBuffer());
  }
  return OkStatus();
}

Status UringSpoolWriter::Append(std::span<const char> header, std::string_view body,
                                std::span<const char> payload) {
  assert(header.size() == kFrameHeaderSize);
  // Pair check with ReadFrame: the header must describe what follows it.
  assert(GetLE<uint32_t>(header.data() + 8) == body.size());
  assert(GetLE<uint32_t>(header.data() + 12) == payload.size());
  RETURN_IF_ERROR(error_);
  RETURN_IF_ERROR(
      CheckSpoolQuota(path_, appended_, header.size() + body.size() + payload.size(), max_bytes_));
  RETURN_IF_ERROR(Copy(header.data(), header.size()));
  RETURN_IF_ERROR(Copy(body.data(), body.size()));
  RETURN_IF_ERROR(Copy(payload.data(), payload.size()));
  assert(buf_file_off_ + fill_ == kSpoolHeaderSize + appended_);
  return OkStatus();
}

Status UringSpoolWriter::SyncDirectory() {
  // A new file's directory entry is durable only once its directory is.
  const std::string dir = DirOf(path_);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return Fail(SpoolErrno(errno, fmt::format("opening spool directory {}", dir)));
  int r;
  do {
    r = ::fsync(dfd);
  } while (r < 0 && errno == EINTR);
  const int e = errno;
  ::close(dfd);
  if (r < 0) return Fail(SpoolErrno(e, fmt::format("fsync of spool directory {}", dir)));
  return OkStatus();
}

StatusOr<uint64_t> UringSpoolWriter::Sync() {
  RETURN_IF_ERROR(error_);
  // An io_uring fsync covers completed writes only: drain the other buffers.
  for (int b = 0; b < kBuffers; ++b) {
    if (b != cur_) RETURN_IF_ERROR(WaitFor(static_cast<Op>(b)));
  }
  const size_t padded = RoundUp(fill_, kAlign);
  std::memset(buf_[cur_] + fill_, 0, padded - fill_);
  fsync_canceled_ = false;
  if (padded > 0) {
    PrepWrite(cur_, padded, buf_file_off_, IOSQE_IO_LINK);
    PrepFsync();
    RETURN_IF_ERROR(Submit({static_cast<Op>(cur_), kFsync}));
  } else {
    PrepFsync();
    RETURN_IF_ERROR(Submit({kFsync}));
  }
  // Wait for both even if the first failed: the buffer must be idle.
  Status st = WaitFor(static_cast<Op>(cur_));
  Status fst = WaitFor(kFsync);
  RETURN_IF_ERROR(st);
  RETURN_IF_ERROR(fst);
  if (fsync_canceled_) return Fail(Internal("spool fdatasync canceled without a failed write"));

  // Keep only the partial last block; the next write rewrites it.
  const size_t whole = fill_ / kAlign * kAlign;
  std::memmove(buf_[cur_], buf_[cur_] + whole, fill_ - whole);
  buf_file_off_ += whole;
  fill_ -= whole;

  if (!dir_synced_) {
    RETURN_IF_ERROR(SyncDirectory());
    dir_synced_ = true;
  }
  return appended_;
}

Status UringSpoolWriter::SyncWritten() {
  if (ring_ready_) {
    for (int op = 0; op < kNumOps; ++op) (void)WaitFor(static_cast<Op>(op));
  }
  int r;
  do {
    r = ::fdatasync(fd_);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return SpoolErrno(errno, fmt::format("fdatasync of spool {}", path_.string()));
  if (!dir_synced_) {
    const std::string dir = DirOf(path_);
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return SpoolErrno(errno, fmt::format("opening spool directory {}", dir));
    do {
      r = ::fsync(dfd);
    } while (r < 0 && errno == EINTR);
    const int e = errno;
    ::close(dfd);
    if (r < 0) return SpoolErrno(e, fmt::format("fsync of spool directory {}", dir));
    dir_synced_ = true;
  }
  return OkStatus();
}

}  // namespace

StatusOr<std::unique_ptr<SpoolWriter>> SpoolWriter::Create(const std::filesystem::path& path,
                                                           const SpoolIdentity& id,
                                                           const SpoolOptions& options) {
  RETURN_IF_ERROR(CheckCreateArgs(id, options));
  auto w = std::make_unique<UringSpoolWriter>(path, options.buffer_bytes, options.max_bytes);
  RETURN_IF_ERROR(w->Init(id, options.direct_io));
  return std::unique_ptr<SpoolWriter>(std::move(w));
}

StatusOr<std::unique_ptr<SpoolWriter>> SpoolWriter::Resume(const std::filesystem::path& path,
                                                           uint64_t logical_end,
                                                           const SpoolOptions& options) {
  RETURN_IF_ERROR(CheckResumeArgs(options));
  auto w = std::make_unique<UringSpoolWriter>(path, options.buffer_bytes, options.max_bytes);
  RETURN_IF_ERROR(w->InitResume(logical_end, options.direct_io));
  return std::unique_ptr<SpoolWriter>(std::move(w));
}

}  // namespace cairn
