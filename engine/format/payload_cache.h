// PayloadCache: the large buffers of frame payloads, kept for the next
// frame instead of going back to malloc.
//
// A payload of 4 MiB that malloc takes from the system (a new mapping, or
// heap pages it trimmed) costs a zeroed page fault per 4 KiB inside the
// copy that first touches it, and its free may hand the pages back again:
// at the sink every data record took two such buffers (received, then
// read back from the spool), as much CPU as the copies themselves
// (docs/PERFORMANCE.md, "Where each CPU second goes"). The cache keeps
// freed payload buffers of 256 KiB or more, at most kMaxBytes in all,
// and gives them back once a trim finds them unused since the last one
// (cairnd trims every few seconds while it waits for a signal).
//
// Thread-safe: one mutex, taken once per large buffer.
#ifndef CAIRN_ENGINE_FORMAT_PAYLOAD_CACHE_H_
#define CAIRN_ENGINE_FORMAT_PAYLOAD_CACHE_H_

#include <cstddef>
#include <cstdint>

namespace cairn::payload_cache {

// Buffers below this size come from malloc as usual.
inline constexpr size_t kMinBytes = 256 * 1024;
// What the cache holds at most, all sizes together: a few 4 MiB payloads,
// what one stream of frames needs (the memory budget bounds those in use).
inline constexpr size_t kMaxBytes = 16ull << 20;

// A buffer of at least `n` bytes (n >= kMinBytes): a cached one of the
// same size class if any, else a new one. Throws std::bad_alloc as new.
void* Take(size_t n);
// Returns a buffer Take(n) gave, for the same n. Kept if the cache has
// room, else freed.
void Give(void* p, size_t n) noexcept;
// Frees every cached buffer if none was taken since the previous call.
// Returns the bytes freed.
size_t TrimIdle() noexcept;

// What the cache holds now, for tests and metrics.
size_t CachedBytes() noexcept;

}  // namespace cairn::payload_cache

#endif  // CAIRN_ENGINE_FORMAT_PAYLOAD_CACHE_H_
