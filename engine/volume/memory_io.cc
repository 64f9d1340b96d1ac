// MemoryAsyncIo: the AsyncIo of MemoryVolume (memory_volume.h) on the chunk
// maps of memory_state.h. Each operation is applied when it starts, under
// the pool's lock; WaitOne returns the completions in start order.
#include <fmt/format.h>

#include <algorithm>
#include <cassert>
#include <cstring>
#include <deque>
#include <utility>

#include "engine/volume/memory_state.h"

namespace cairn {
namespace memory_internal {
namespace {

enum class IoKind { kRead, kWrite, kZero };

bool AllZero(const char* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

// Calls fn(chunk index, offset in chunk, offset in the request, length) for
// each chunk that [offset, offset+length) touches.
template <typename Fn>
void ForEachChunk(uint64_t chunk_size, uint64_t offset, uint64_t length, Fn&& fn) {
  uint64_t done = 0;
  while (done < length) {
    const uint64_t pos = offset + done;
    const uint64_t index = pos / chunk_size;
    const uint64_t in_chunk = pos % chunk_size;
    const uint64_t n = std::min(chunk_size - in_chunk, length - done);
    fn(index, in_chunk, done, n);
    done += n;
  }
}

void WriteChunks(ChunkMap& chunks, uint64_t chunk_size, uint64_t offset,
                 std::span<const char> buf) {
  ForEachChunk(chunk_size, offset, buf.size(),
               [&](uint64_t index, uint64_t in_chunk, uint64_t at, uint64_t n) {
                 auto it = chunks.find(index);
                 std::string data =
                     it != chunks.end() ? *it->second : std::string(chunk_size, '\0');
                 std::memcpy(data.data() + in_chunk, buf.data() + at, n);
                 chunks[index] = std::make_shared<const std::string>(std::move(data));
               });
}

void ZeroChunks(ChunkMap& chunks, uint64_t chunk_size, uint64_t offset, uint64_t length) {
  ForEachChunk(chunk_size, offset, length,
               [&](uint64_t index, uint64_t in_chunk, uint64_t, uint64_t n) {
                 auto it = chunks.find(index);
                 if (it == chunks.end()) return;
                 if (n == chunk_size) {
                   chunks.erase(it);
                   return;
                 }
                 std::string data = *it->second;
                 std::memset(data.data() + in_chunk, 0, n);
                 if (AllZero(data.data(), data.size())) {
                   chunks.erase(it);
                 } else {
                   it->second = std::make_shared<const std::string>(std::move(data));
                 }
               });
}

void ReadChunks(const ChunkMap& chunks, uint64_t chunk_size, uint64_t offset, std::span<char> buf) {
  ForEachChunk(chunk_size, offset, buf.size(),
               [&](uint64_t index, uint64_t in_chunk, uint64_t at, uint64_t n) {
                 auto it = chunks.find(index);
                 if (it == chunks.end()) {
                   std::memset(buf.data() + at, 0, n);
                 } else {
                   std::memcpy(buf.data() + at, it->second->data() + in_chunk, n);
                 }
               });
}

class MemoryAsyncIo final : public AsyncIo {
 public:
  // `snap_id` 0 is the head (read-write); otherwise the snapshot with that
  // id (read-only).
  MemoryAsyncIo(std::shared_ptr<PoolState> pool, std::shared_ptr<ImageState> image,
                std::string snap, uint64_t snap_id, uint64_t snap_size)
      : pool_(std::move(pool)),
        image_(std::move(image)),
        snap_(std::move(snap)),
        snap_id_(snap_id),
        snap_size_(snap_size) {}

  ~MemoryAsyncIo() override {
    if (snap_id_ == 0) {
      std::lock_guard lock(pool_->mu);
      --image_->head_handles;
    }
  }

  Status StartRead(uint64_t tag, uint64_t offset, std::span<char> buf) override {
    return Start(IoKind::kRead, tag, offset, buf.size(), [&](ChunkMap& chunks) {
      ReadChunks(chunks, pool_->options.chunk_size, offset, buf);
    });
  }

  Status StartWrite(uint64_t tag, uint64_t offset, std::span<const char> buf) override {
    RETURN_IF_ERROR(Start(IoKind::kWrite, tag, offset, buf.size(), [&](ChunkMap& chunks) {
      WriteChunks(chunks, pool_->options.chunk_size, offset, buf);
    }));
    ++stats_.writes;  // one operation each
    ++stats_.ops;
    return OkStatus();
  }

  Status StartZero(uint64_t tag, uint64_t offset, uint64_t length) override {
    return Start(IoKind::kZero, tag, offset, length, [&](ChunkMap& chunks) {
      ZeroChunks(chunks, pool_->options.chunk_size, offset, length);
    });
  }

  Completion WaitOne() override {
    assert(!done_.empty() && "WaitOne with nothing in flight");
    Completion c = std::move(done_.front());
    done_.pop_front();
    return c;
  }

  size_t InFlight() const override { return done_.size(); }

  WriteStats write_stats() const override { return stats_; }

  Status Drain() override { return WaitAll(); }

 private:
  template <typename Apply>
  Status Start(IoKind op, uint64_t tag, uint64_t offset, uint64_t length, Apply&& apply) {
    const std::string what = Describe(op, offset, length);
    if (op != IoKind::kRead && snap_id_ != 0) {
      return FailedPrecondition(what + ": a snapshot is read-only");
    }
    RETURN_IF_ERROR(CheckStart(what, offset, length));
    std::lock_guard lock(pool_->mu);
    if (op == IoKind::kRead && snap_id_ != 0 && Vanished()) {
      // As RADOS does: the objects trimmed with a removed snapshot (or
      // image) read as absent, that is as zeros, without an error
      // (Volume::ConfirmSnap is what finds out).
      ChunkMap none;
      apply(none);
      done_.push_back({tag, OkStatus()});
      return OkStatus();
    }
    // The image may have shrunk or gone since CheckStart (another thread):
    // that is a failed I/O, reported with its completion.
    StatusOr<ChunkMap*> chunks = ChunksLocked(what, offset, length);
    if (!chunks.ok()) {
      done_.push_back({tag, chunks.status()});
      return OkStatus();
    }
    apply(**chunks);
    done_.push_back({tag, OkStatus()});
    return OkStatus();
  }

  Status CheckStart(const std::string& what, uint64_t offset, uint64_t length) {
    std::lock_guard lock(pool_->mu);
    if (snap_id_ != 0 && Vanished()) {
      return offset > snap_size_ || length > snap_size_ - offset
                 ? InvalidArgument(
                       fmt::format("{}: beyond the end of the image ({} bytes)", what, snap_size_))
                 : OkStatus();
    }
    return ChunksLocked(what, offset, length).status();
  }

  // The snapshot this handle reads, or its image, was removed.
  // REQUIRES: pool_->mu held.
  bool Vanished() { return image_->removed || FindSnapById(*image_, snap_id_) == nullptr; }

  // The chunk map this handle reads or writes, after checking the range.
  // REQUIRES: pool_->mu held.
  StatusOr<ChunkMap*> ChunksLocked(const std::string& what, uint64_t offset, uint64_t length) {
    if (image_->removed) return NotFound(what + ": the image was removed");
    ChunkMap* chunks = &image_->head;
    uint64_t size = image_->size;
    if (snap_id_ != 0) {
      SnapState* s = FindSnapById(*image_, snap_id_);
      if (s == nullptr) return NotFound(what + ": the snapshot was removed");
      chunks = &s->chunks;
      size = s->size;
    }
    if (offset > size || length > size - offset) {
      return InvalidArgument(fmt::format("{}: beyond the end of the image ({} bytes)", what, size));
    }
    return chunks;
  }

  std::string Describe(IoKind op, uint64_t offset, uint64_t length) const {
    const char* verb = op == IoKind::kRead    ? "reading"
                       : op == IoKind::kWrite ? "writing"
                                              : "zeroing";
    return fmt::format("{} {}/{}{}{} at {}~{}", verb, pool_->name, image_->name,
                       snap_.empty() ? "" : "@", snap_, offset, length);
  }

  std::shared_ptr<PoolState> pool_;
  std::shared_ptr<ImageState> image_;
  const std::string snap_;
  const uint64_t snap_id_;
  const uint64_t snap_size_;  // at OpenIo, for reads after it is gone
  std::deque<Completion> done_;
  WriteStats stats_;
};

}  // namespace

std::unique_ptr<AsyncIo> NewMemoryAsyncIo(std::shared_ptr<PoolState> pool,
                                          std::shared_ptr<ImageState> image, std::string snap,
                                          uint64_t snap_id, uint64_t snap_size) {
  return std::make_unique<MemoryAsyncIo>(std::move(pool), std::move(image), std::move(snap),
                                         snap_id, snap_size);
}

}  // namespace memory_internal
}  // namespace cairn
