// The state of MemoryPool (memory_volume.h), shared by the files of the
// in-memory store: memory_volume.cc (pools, images, snapshots) and
// memory_io.cc (AsyncIo on chunk maps) and memory_group.cc (groups and their
// snapshots). Not for other users.
//
// Thread-safety: every field of an ImageState, SnapState or GroupState, and
// the pool's maps of images and groups, is guarded by the PoolState's mutex.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/volume/memory_volume.h"
#include "engine/volume/volume.h"

namespace cairn {
namespace memory_internal {

// Exactly chunk_size bytes; never modified once shared.
using Chunk = std::shared_ptr<const std::string>;
// Chunk index -> chunk; only allocated chunks are present.
using ChunkMap = std::map<uint64_t, Chunk>;

struct SnapState {
  std::string name;
  uint64_t id = 0;
  uint64_t size = 0;
  int64_t time_ns = 0;
  ChunkMap chunks;
  int clones = 0;  // images cloned from this snapshot that still exist
};

struct ImageState {
  explicit ImageState(std::string n) : name(std::move(n)) {}
  std::string name;
  uint64_t size = 0;
  ChunkMap head;
  std::vector<SnapState> snaps;  // creation order, ids ascending
  // For a clone: the snapshot it pins.
  std::shared_ptr<ImageState> parent;
  uint64_t parent_snap_id = 0;
  // Volumes that used the head (a read-write handle on RBD: resize,
  // snapshots, head I/O) and head AsyncIos.
  int head_handles = 0;
  bool removed = false;
  std::vector<std::string> other_clients;  // MemoryPool::SetOtherClients
  std::string group;                       // the group it is in, or ""
};

// A group snapshot: its name, and the images it was taken of (each holds a
// snapshot named GroupSnapName(name)). As in RBD, the images are those of
// the group when it was taken: one that left the group since keeps its
// share, and removing the group snapshot removes that too.
struct GroupSnapState {
  std::string name;
  std::vector<std::shared_ptr<ImageState>> images;
};

struct GroupState {
  std::vector<GroupSnapState> snaps;  // creation order
};

struct PoolState {
  PoolState(std::string n, MemoryPoolOptions o) : name(std::move(n)), options(std::move(o)) {}
  const std::string name;
  const MemoryPoolOptions options;
  std::mutex mu;
  std::map<std::string, std::shared_ptr<ImageState>> images;  // guarded by mu
  std::map<std::string, GroupState> groups;                   // guarded by mu
  uint64_t next_snap_id = 1;                                  // guarded by mu
};

// The snapshot of `image` named `snap`, or null. REQUIRES: the pool's mutex held.
inline SnapState* FindSnap(ImageState& image, const std::string& snap) {
  for (auto& s : image.snaps) {
    if (s.name == snap) return &s;
  }
  return nullptr;
}

// The snapshot of `image` with id `id`, or null. REQUIRES: the pool's mutex held.
inline SnapState* FindSnapById(ImageState& image, uint64_t id) {
  for (auto& s : image.snaps) {
    if (s.id == id) return &s;
  }
  return nullptr;
}

// AsyncIo on `image`: at its head if `snap_id` is 0 (read-write; the
// caller has counted it among the image's head handles, and the AsyncIo
// uncounts it when it goes), else at the snapshot `snap` with that id and
// `snap_size` (read-only).
std::unique_ptr<AsyncIo> NewMemoryAsyncIo(std::shared_ptr<PoolState> pool,
                                          std::shared_ptr<ImageState> image, std::string snap,
                                          uint64_t snap_id, uint64_t snap_size);

}  // namespace memory_internal
}  // namespace cairn
