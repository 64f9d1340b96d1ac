// One librbd or librados operation in flight and the queue its completion
// is handed to (rbd_aio.cc): what RbdAsyncIo, ObjectWriter (rbd_io.cc) and
// CopyData (rbd_copy.cc) build on. Not for use outside engine/ceph/.
//
// Thread-safety: a CompletionQueue is pushed to from librbd's and
// librados' threads and popped by one thread; a PendingOp belongs to one
// owner at a time (see PendingOp).
#pragma once

#include <rados/librados.h>
#include <rbd/librbd.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/ceph/handoff_queue.h"
#include "engine/volume/volume.h"

namespace cairn::rbd_internal {

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

// The completion callback of a librados operation (kObjectWrite): run on a
// librados thread, it only hands the operation over to its queue.
void OnRadosComplete(rados_completion_t, void* arg);

// "reading SPEC at OFFSET~LENGTH", and so on, for messages.
std::string Describe(OpKind kind, const std::string& spec, uint64_t offset, uint64_t length);

// Starts one librbd operation whose completion goes to `queue`. `buf` is
// read into or written from; it must live until the completion is popped.
Status StartOp(rbd_image_t image, CompletionQueue& queue, OpKind kind, uint64_t tag,
               uint64_t offset, uint64_t length, char* buf, const std::string& spec,
               Batch* primes = nullptr);

// Takes a popped librbd operation apart: its tag and its outcome.
AsyncIo::Completion FinishOp(PendingOp* op, const std::string& spec);

}  // namespace cairn::rbd_internal
