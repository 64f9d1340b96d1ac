// Asynchronous I/O on an image (AsyncIo through librbd completions), writes
// of whole RADOS objects beside librbd (ObjectWriter), and sparse copies.

#include <endian.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/ceph/handoff_queue.h"
#include "engine/ceph/rbd_internal.h"

namespace cairn {

namespace rbd_internal {

// --- asynchronous I/O --------------------------------------------------------

// kObjectWrite: the pieces of one RADOS object, written in one op beside
// librbd (see ObjectWriter).
enum class OpKind { kRead, kWrite, kZero, kObjectWrite };

struct PendingOp;
using CompletionQueue = HandoffQueue<PendingOp*>;

// The writes of one RADOS object of the image within one AsyncIo: the first
// goes through librbd, the rest wait in `pieces` until it has completed
// (ObjectWriter says why).
struct Batch {
  struct Piece {
    uint64_t tag = 0;
    uint64_t offset = 0;  // in the image
    std::span<const char> data;
  };
  uint64_t object = 0;
  std::vector<Piece> pieces;
  bool closed = false;  // no more pieces will join
  bool primed = false;  // the first write has completed, with prime_status
  Status prime_status;
};

// One operation handed to librbd or librados; owned by it from start to
// callback, then by the queue, then by whoever pops it.
struct PendingOp {
  CompletionQueue* queue = nullptr;
  rbd_completion_t completion = nullptr;          // librbd ops
  rados_completion_t rados_completion = nullptr;  // kObjectWrite
  rados_write_op_t write_op = nullptr;            // kObjectWrite
  uint64_t tag = 0;
  std::vector<uint64_t> tags;  // kObjectWrite: one per piece
  OpKind kind = OpKind::kRead;
  uint64_t offset = 0;
  uint64_t length = 0;
  Batch* primes = nullptr;  // a kWrite that is the first write of this batch
};

// Run on a librbd or librados thread: only hand the operation over.
static void OnRbdComplete(rbd_completion_t, void* arg) {
  auto* op = static_cast<PendingOp*>(arg);
  op->queue->Push(op);
}
static void OnRadosComplete(rados_completion_t, void* arg) {
  auto* op = static_cast<PendingOp*>(arg);
  op->queue->Push(op);
}

static std::string Describe(OpKind kind, const std::string& spec, uint64_t offset,
                            uint64_t length) {
  const char* verb = kind == OpKind::kRead   ? "reading"
                     : kind == OpKind::kZero ? "zeroing"
                                             : "writing";
  return fmt::format("{} {} at {}~{}", verb, spec, offset, length);
}

// Starts one librbd operation whose completion goes to `queue`. `buf` is
// read into or written from; it must live until the completion is popped.
static Status StartOp(rbd_image_t image, CompletionQueue& queue, OpKind kind, uint64_t tag,
                      uint64_t offset, uint64_t length, char* buf, const std::string& spec,
                      Batch* primes = nullptr) {
  assert(kind != OpKind::kObjectWrite);
  auto op = std::make_unique<PendingOp>();
  op->queue = &queue;
  op->tag = tag;
  op->kind = kind;
  op->offset = offset;
  op->length = length;
  op->primes = primes;
  int rc = rbd_aio_create_completion(op.get(), OnRbdComplete, &op->completion);
  if (rc < 0) return ErrnoStatus(rc, Describe(kind, spec, offset, length));
  switch (kind) {
    case OpKind::kRead:
      rc = rbd_aio_read(image, offset, length, buf, op->completion);
      break;
    case OpKind::kWrite:
      rc = rbd_aio_write(image, offset, length, buf, op->completion);
      break;
    case OpKind::kZero:
      rc = rbd_aio_write_zeroes(image, offset, length, op->completion, 0, 0);
      break;
    case OpKind::kObjectWrite:
      break;
  }
  if (rc < 0) {
    rbd_aio_release(op->completion);
    return ErrnoStatus(rc, Describe(kind, spec, offset, length));
  }
  op.release();  // librbd's until the callback
  return OkStatus();
}

// Takes a popped librbd operation apart: its tag and its outcome.
static AsyncIo::Completion FinishOp(PendingOp* op, const std::string& spec) {
  std::unique_ptr<PendingOp> owned(op);
  const ssize_t rc = rbd_aio_get_return_value(op->completion);
  rbd_aio_release(op->completion);
  AsyncIo::Completion c{op->tag, OkStatus()};
  const std::string what = Describe(op->kind, spec, op->offset, op->length);
  if (rc < 0) {
    c.status = ErrnoStatus(static_cast<int>(rc), what);
  } else if (op->kind == OpKind::kRead && static_cast<uint64_t>(rc) != op->length) {
    // librbd clips I/O at the end of the image: it shrank under us.
    c.status = Aborted(fmt::format("{}: short read of {} bytes (did the image shrink?)", what, rc));
  } else if (op->kind != OpKind::kRead && rc != 0 && static_cast<uint64_t>(rc) != op->length) {
    c.status =
        Aborted(fmt::format("{}: short write of {} bytes (did the image shrink?)", what, rc));
  }
  return c;
}

class ObjectWriter {
 public:
  // Null if the image's layout rules the object writes out (see above).
  static StatusOr<std::unique_ptr<ObjectWriter>> Open(rbd_image_t h, const RadosIoCtx& meta,
                                                      const std::string& spec) {
    uint8_t old = 0;
    uint64_t features = 0, stripe_unit = 0, stripe_count = 0;
    rbd_image_info_t info{};
    if (int rc = rbd_get_old_format(h, &old); rc < 0) return ErrnoStatus(rc, "inspecting " + spec);
    if (int rc = rbd_get_features(h, &features); rc < 0) {
      return ErrnoStatus(rc, "getting the features of " + spec);
    }
    if (int rc = rbd_get_stripe_unit(h, &stripe_unit); rc < 0) {
      return ErrnoStatus(rc, "getting the stripe unit of " + spec);
    }
    if (int rc = rbd_get_stripe_count(h, &stripe_count); rc < 0) {
      return ErrnoStatus(rc, "getting the stripe count of " + spec);
    }
    if (int rc = rbd_stat(h, &info, sizeof info); rc < 0) return ErrnoStatus(rc, "stat " + spec);
    if (old != 0 || (features & RBD_FEATURE_JOURNALING) != 0 || stripe_count != 1 ||
        stripe_unit != info.obj_size || info.obj_size == 0) {
      spdlog::debug(
          "{}: writes go through librbd one by one (format {}, features {:#x}, "
          "stripe {}x{}, object size {})",
          spec, old ? 1 : 2, features, stripe_count, stripe_unit, info.obj_size);
      return std::unique_ptr<ObjectWriter>();
    }
    std::array<char, 128> buf{};
    if (int rc = rbd_get_block_name_prefix(h, buf.data(), buf.size()); rc < 0) {
      return ErrnoStatus(rc, "getting the object name prefix of " + spec);
    }
    const std::string prefix = buf.data();
    ASSIGN_OR_RETURN(const std::string id, ImageId(h, spec));
    const std::string header = "rbd_header." + id;
    ASSIGN_OR_RETURN(auto snapc, ReadSnapContext(meta.get(), header, spec));

    const int64_t data_pool = rbd_get_data_pool_id(h);
    if (data_pool < 0) {
      return ErrnoStatus(static_cast<int>(data_pool), "getting the data pool of " + spec);
    }
    rados_ioctx_t io = nullptr;
    if (int rc = rados_ioctx_create2(rados_ioctx_get_cluster(meta.get()), data_pool, &io); rc < 0) {
      return ErrnoStatus(rc, fmt::format("opening the data pool (id {}) of {}", data_pool, spec));
    }
    auto w = std::unique_ptr<ObjectWriter>(new ObjectWriter(io, prefix, info.obj_size));
    buf.fill(0);
    if (int rc = rados_ioctx_get_namespace(meta.get(), buf.data(), buf.size()); rc < 0) {
      return ErrnoStatus(rc, "getting the namespace of " + spec);
    }
    rados_ioctx_set_namespace(io, buf.data());
    std::vector<rados_snap_t> snaps(snapc.second.begin(), snapc.second.end());
    if (int rc = rados_ioctx_selfmanaged_snap_set_write_ctx(io, snapc.first, snaps.data(),
                                                            static_cast<int>(snaps.size()));
        rc < 0) {
      return ErrnoStatus(rc, "setting the snapshot context of " + spec);
    }
    return w;
  }

  ~ObjectWriter() { rados_ioctx_destroy(io_); }
  ObjectWriter(const ObjectWriter&) = delete;
  ObjectWriter& operator=(const ObjectWriter&) = delete;

  uint64_t object_size() const { return object_size_; }

  // Starts one op writing `pieces` (all in object `object`); its completion
  // goes to `queue`. The pieces' data must live until it is popped.
  Status Start(CompletionQueue& queue, uint64_t object, const std::vector<Batch::Piece>& pieces,
               const std::string& spec) {
    const std::string oid = fmt::format("{}.{:016x}", prefix_, object);
    auto op = std::make_unique<PendingOp>();
    op->queue = &queue;
    op->kind = OpKind::kObjectWrite;
    op->offset = object * object_size_;
    op->length = object_size_;
    op->write_op = rados_create_write_op();
    for (const Batch::Piece& p : pieces) {
      rados_write_op_write(op->write_op, p.data.data(), p.data.size(), p.offset - op->offset);
      op->tags.push_back(p.tag);
    }
    int rc = rados_aio_create_completion2(op.get(), OnRadosComplete, &op->rados_completion);
    if (rc == 0) {
      rc = rados_aio_write_op_operate(op->write_op, io_, op->rados_completion, oid.c_str(), nullptr,
                                      0);
      if (rc < 0) rados_aio_release(op->rados_completion);
    }
    if (rc < 0) {
      rados_release_write_op(op->write_op);
      return ErrnoStatus(
          rc, fmt::format("writing {} pieces of {} to object {}", pieces.size(), spec, oid));
    }
    op.release();  // librados's until the callback
    return OkStatus();
  }

  // Takes a popped kObjectWrite apart: its outcome (for every tag).
  static Status Finish(PendingOp* op, const std::string& spec) {
    std::unique_ptr<PendingOp> owned(op);
    const int rc = rados_aio_get_return_value(op->rados_completion);
    rados_aio_release(op->rados_completion);
    rados_release_write_op(op->write_op);
    if (rc < 0) {
      return ErrnoStatus(rc, fmt::format("writing {} pieces of {} at {}~{} (one object)",
                                         op->tags.size(), spec, op->offset, op->length));
    }
    return OkStatus();
  }

 private:
  ObjectWriter(rados_ioctx_t io, std::string prefix, uint64_t object_size)
      : io_(io), prefix_(std::move(prefix)), object_size_(object_size) {}

  rados_ioctx_t io_;
  const std::string prefix_;
  const uint64_t object_size_;
};

class RbdAsyncIo final : public AsyncIo {
 public:
  // `objects`, if given, writes the pieces of one object after its first
  // (ObjectWriter).
  RbdAsyncIo(std::shared_ptr<Image> image, bool read_only, std::string spec,
             std::unique_ptr<ObjectWriter> objects = nullptr)
      : image_(std::move(image)),
        read_only_(read_only),
        spec_(std::move(spec)),
        objects_(std::move(objects)) {}

  // librbd may still write into the caller's buffers: wait for everything.
  ~RbdAsyncIo() override {
    while (in_flight_ > 0) (void)WaitOne();
  }

  Status StartRead(uint64_t tag, uint64_t offset, std::span<char> buf) override {
    return Start(OpKind::kRead, tag, offset, buf.size(), buf.data());
  }

  Status StartWrite(uint64_t tag, uint64_t offset, std::span<const char> buf) override {
    const uint64_t osize = objects_ ? objects_->object_size() : 0;
    if (!objects_ || read_only_ || buf.empty() ||
        offset / osize != (offset + buf.size() - 1) / osize) {
      // librbd only reads a write's buffer.
      return Start(OpKind::kWrite, tag, offset, buf.size(), const_cast<char*>(buf.data()));
    }
    RETURN_IF_ERROR(CheckRange(OpKind::kWrite, offset, buf.size()));
    ++stats_.writes;
    const uint64_t object = offset / osize;
    if (open_ != nullptr && open_->object != object) CloseOpen();
    if (open_ != nullptr) {
      open_->pieces.push_back({tag, offset, buf});
      ++in_flight_;
      return OkStatus();
    }
    Batch& b = batches_.emplace_back();
    b.object = object;
    Status st = StartOp(image_->get(), queue_, OpKind::kWrite, tag, offset, buf.size(),
                        const_cast<char*>(buf.data()), spec_, &b);
    if (!st.ok()) {
      batches_.pop_back();
      return st;
    }
    open_ = &b;
    ++stats_.ops;
    ++ops_in_flight_;
    ++in_flight_;
    return OkStatus();
  }

  Status StartZero(uint64_t tag, uint64_t offset, uint64_t length) override {
    return Start(OpKind::kZero, tag, offset, length, nullptr);
  }

  Completion WaitOne() override {
    assert(in_flight_ > 0 && "WaitOne with nothing in flight");
    while (ready_.empty()) {
      if (ops_in_flight_ == 0) {
        // Only pieces wait, in the open batch (whose first write is done):
        // send them now.
        assert(open_ != nullptr && open_->primed);
        CloseOpen();
        continue;
      }
      Handle(queue_.Pop());
    }
    Completion c = std::move(ready_.front());
    ready_.pop_front();
    --in_flight_;
    return c;
  }

  size_t InFlight() const override { return in_flight_; }

  WriteStats write_stats() const override { return stats_; }

  Status Drain() override {
    if (open_ != nullptr) CloseOpen();
    RETURN_IF_ERROR(WaitAll());
    if (!read_only_) {
      if (int rc = rbd_flush(image_->get()); rc < 0) return ErrnoStatus(rc, "flushing " + spec_);
      if (objects_) {
        spdlog::debug("{}: {} writes in {} ops", spec_, stats_.writes, stats_.ops);
      }
    }
    return OkStatus();
  }

 private:
  Status CheckRange(OpKind kind, uint64_t offset, uint64_t length) {
    if (kind != OpKind::kRead && read_only_) {
      return FailedPrecondition(Describe(kind, spec_, offset, length) +
                                ": a snapshot is read-only");
    }
    // librbd would clip an I/O at the end of the image; refuse it instead.
    ASSIGN_OR_RETURN(uint64_t size, ImageSize(image_->get(), spec_));
    if (offset > size || length > size - offset) {
      return InvalidArgument(fmt::format("{}: beyond the end of the image ({} bytes)",
                                         Describe(kind, spec_, offset, length), size));
    }
    return OkStatus();
  }

  Status Start(OpKind kind, uint64_t tag, uint64_t offset, uint64_t length, char* buf) {
    RETURN_IF_ERROR(CheckRange(kind, offset, length));
    RETURN_IF_ERROR(StartOp(image_->get(), queue_, kind, tag, offset, length, buf, spec_));
    if (kind == OpKind::kWrite) {
      ++stats_.writes;
      ++stats_.ops;
    }
    ++ops_in_flight_;
    ++in_flight_;
    return OkStatus();
  }

  // One completed op: its completions go to ready_.
  void Handle(PendingOp* op) {
    --ops_in_flight_;
    if (op->kind == OpKind::kObjectWrite) {
      const std::vector<uint64_t> tags = op->tags;
      const Status st = ObjectWriter::Finish(op, spec_);
      for (uint64_t tag : tags) ready_.push_back({tag, st});
      return;
    }
    Batch* b = op->primes;
    Completion c = FinishOp(op, spec_);
    if (b != nullptr) {
      b->primed = true;
      b->prime_status = c.status;
    }
    ready_.push_back(std::move(c));
    if (b != nullptr && b->closed) Send(b);
  }

  void CloseOpen() {
    Batch* b = open_;
    open_ = nullptr;
    b->closed = true;
    if (b->primed) Send(b);
  }

  // Sends the pieces of a closed batch whose first write has completed,
  // and forgets the batch.
  void Send(Batch* b) {
    assert(b->closed && b->primed);
    std::vector<Batch::Piece> pieces = std::move(b->pieces);
    const uint64_t object = b->object;
    const Status prime = b->prime_status;
    batches_.remove_if([b](const Batch& x) { return &x == b; });
    if (pieces.empty()) return;
    const auto fail_all = [&](const Status& st) {
      for (const Batch::Piece& p : pieces) {
        ready_.push_back(
            {p.tag, st.Annotate(Describe(OpKind::kWrite, spec_, p.offset, p.data.size()))});
      }
    };
    if (!prime.ok()) {
      fail_all(prime.Annotate("not sent: the first write to its object failed"));
      return;
    }
    if (!StillLockOwner()) {
      for (const Batch::Piece& p : pieces) {
        Status st = StartOp(image_->get(), queue_, OpKind::kWrite, p.tag, p.offset, p.data.size(),
                            const_cast<char*>(p.data.data()), spec_);
        if (!st.ok()) {
          ready_.push_back({p.tag, st});
          continue;
        }
        ++stats_.ops;
        ++ops_in_flight_;
      }
      return;
    }
    if (Status st = objects_->Start(queue_, object, pieces, spec_); !st.ok()) {
      fail_all(st);
      return;
    }
    ++stats_.ops;
    ++ops_in_flight_;
  }

  // Whether this client still owns the image's exclusive lock (true if the
  // image has none). librbd lets the lock go when another client asks.
  bool StillLockOwner() {
    uint64_t features = 0;
    if (rbd_get_features(image_->get(), &features) < 0) return false;
    if ((features & RBD_FEATURE_EXCLUSIVE_LOCK) == 0) return true;
    int owner = 0;
    return rbd_is_exclusive_lock_owner(image_->get(), &owner) == 0 && owner != 0;
  }

  std::shared_ptr<Image> image_;
  const bool read_only_;
  const std::string spec_;
  const std::unique_ptr<ObjectWriter> objects_;
  CompletionQueue queue_;
  size_t in_flight_ = 0;      // started, completion not yet returned
  size_t ops_in_flight_ = 0;  // librbd and librados ops not yet handled
  std::list<Batch> batches_;  // with pieces waiting or a first write in flight
  Batch* open_ = nullptr;     // the batch that further writes to its object join
  std::deque<Completion> ready_;
  WriteStats stats_;
};

static bool AllZero(const char* p, size_t n) {
  static const char kZeros[4096] = {};
  while (n > 0) {
    const size_t k = std::min(n, sizeof kZeros);
    if (std::memcmp(p, kZeros, k) != 0) return false;
    p += k;
    n -= k;
  }
  return true;
}

// Copies the allocated data of `src` (read-only, at its snapshot) into the
// fresh image `dst`, kCopySlots pieces in flight.
Status CopyData(rbd_image_t src, rbd_image_t dst, const std::string& pool,
                const std::string& src_image, const std::string& snap, const std::string& dst_spec,
                uint64_t size, const ProgressFn& progress) {
  const std::string src_spec = ImageSpec(pool, src_image, snap);
  CompletionQueue queue;
  std::array<std::vector<char>, kCopySlots> bufs;
  std::vector<size_t> free_slots;
  for (size_t i = kCopySlots; i > 0; --i) free_slots.push_back(i - 1);
  size_t in_flight = 0;
  Status first;
  std::set<uint64_t> outstanding;  // offsets of pieces not yet written
  uint64_t issued_to = 0;          // end of the last piece started
  uint64_t reported = 0;
  if (progress) progress(0, size);

  auto report = [&] {
    const uint64_t done = outstanding.empty() ? issued_to : *outstanding.begin();
    if (progress && done > reported) {
      reported = done;
      progress(done, size);
    }
  };
  // Pops one completion: a finished read starts its write; a finished write
  // frees its slot. The tag is the slot.
  auto handle_one = [&] {
    PendingOp* op = queue.Pop();
    --in_flight;
    const OpKind kind = op->kind;
    const uint64_t offset = op->offset;
    const uint64_t length = op->length;
    const AsyncIo::Completion c = FinishOp(op, kind == OpKind::kRead ? src_spec : dst_spec);
    const size_t slot = c.tag;
    auto release = [&] {
      free_slots.push_back(slot);
      outstanding.erase(offset);
      report();
    };
    if (!c.status.ok()) {
      if (first.ok()) first = c.status;
      release();
      return;
    }
    if (kind == OpKind::kRead && first.ok() && !AllZero(bufs[slot].data(), length)) {
      Status st =
          StartOp(dst, queue, OpKind::kWrite, slot, offset, length, bufs[slot].data(), dst_spec);
      if (st.ok()) {
        ++in_flight;
        return;
      }
      first = st;
    }
    release();  // written, or all zeros (the new image reads zeros already)
  };

  Status listed = DiffImage(src, pool, src_image, "", snap, [&](const Extent& e) -> Status {
    if (e.kind != RecordKind::kData) return OkStatus();
    const uint64_t end = e.offset + e.length;
    for (uint64_t pos = e.offset; pos < end;) {
      const uint64_t n = std::min(kCopyPiece - pos % kCopyPiece, end - pos);
      while (free_slots.empty()) handle_one();
      if (!first.ok()) return first;
      const size_t slot = free_slots.back();
      if (bufs[slot].empty()) bufs[slot].resize(kCopyPiece);
      RETURN_IF_ERROR(
          StartOp(src, queue, OpKind::kRead, slot, pos, n, bufs[slot].data(), src_spec));
      free_slots.pop_back();
      ++in_flight;
      outstanding.insert(pos);
      pos += n;
      issued_to = pos;
    }
    return OkStatus();
  });
  while (in_flight > 0) handle_one();  // never leave librbd with our buffers
  RETURN_IF_ERROR(listed);
  RETURN_IF_ERROR(first);
  if (int rc = rbd_flush(dst); rc < 0) return ErrnoStatus(rc, "flushing " + dst_spec);
  issued_to = size;
  report();
  return OkStatus();
}

}  // namespace rbd_internal

using namespace rbd_internal;  // the adapters' shared helpers (rbd_internal.h)

StatusOr<std::unique_ptr<AsyncIo>> RbdVolume::OpenIo(const std::string& snap) {
  if (snap.empty()) {
    ASSIGN_OR_RETURN(auto h, Head());
    ASSIGN_OR_RETURN(std::unique_ptr<ObjectWriter> objects,
                     ObjectWriter::Open(h->get(), *io_, Spec()));
    return std::unique_ptr<AsyncIo>(
        std::make_unique<RbdAsyncIo>(std::move(h), false, Spec(), std::move(objects)));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<Image> at, AtSnap(snap));
  // Through librbd. Reading a snapshot's RADOS objects directly (one read
  // op per object) was tried and removed: cairnd aborted with a corrupted
  // heap under it (docs/perf-history.md, "Per-object reads, removed").
  return std::unique_ptr<AsyncIo>(std::make_unique<RbdAsyncIo>(std::move(at), true, Spec(snap)));
}

}  // namespace cairn
