// Asynchronous I/O on an image (AsyncIo through librbd completions) and
// writes of whole RADOS objects beside librbd (ObjectWriter).

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
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/ceph/rbd_aio.h"
#include "engine/ceph/rbd_internal.h"

namespace cairn {

namespace rbd_internal {

// --- asynchronous I/O --------------------------------------------------------

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
