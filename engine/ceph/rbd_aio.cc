#include "engine/ceph/rbd_aio.h"

#include <fmt/format.h>

#include <cassert>
#include <memory>

#include "engine/ceph/rbd_internal.h"

namespace cairn::rbd_internal {

// Run on a librbd or librados thread: only hand the operation over.
static void OnRbdComplete(rbd_completion_t, void* arg) {
  auto* op = static_cast<PendingOp*>(arg);
  op->queue->Push(op);
}
void OnRadosComplete(rados_completion_t, void* arg) {
  auto* op = static_cast<PendingOp*>(arg);
  op->queue->Push(op);
}

std::string Describe(OpKind kind, const std::string& spec, uint64_t offset, uint64_t length) {
  const char* verb = kind == OpKind::kRead   ? "reading"
                     : kind == OpKind::kZero ? "zeroing"
                                             : "writing";
  return fmt::format("{} {} at {}~{}", verb, spec, offset, length);
}

Status StartOp(rbd_image_t image, CompletionQueue& queue, OpKind kind, uint64_t tag,
               uint64_t offset, uint64_t length, char* buf, const std::string& spec,
               Batch* primes) {
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

AsyncIo::Completion FinishOp(PendingOp* op, const std::string& spec) {
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

}  // namespace cairn::rbd_internal
