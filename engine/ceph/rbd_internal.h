// What the librbd/librados adapters (rbd_*.cc) share among themselves: the
// image-context gate and handle, and helpers over librbd and cls_rbd. Not
// for use outside engine/ceph/.
//
// Thread-safety: as each declaration says; the helpers are thread-safe
// unless they take a handle that is not.
#pragma once

#include <rados/librados.h>
#include <rbd/librbd.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/base/status.h"
#include "engine/ceph/rados.h"
#include "engine/ceph/rbd_volume.h"
#include "engine/volume/volume.h"

namespace cairn::rbd_internal {

// --- Image contexts (rbd_image.cc) ------------------------------------------

// librbd 16.2 does not survive images being opened and closed in several
// threads of one process at once: six threads opening and closing
// snapshots of their own images crash it within a minute, in two runs of
// three (std::system_error "Invalid argument", or SIGSEGV in the copy of
// the configuration every image context takes), and not once in five
// minutes with those calls serialised. So every call that makes or drops an
// image context (open, close, create, clone, rename, remove, listing clones)
// holds this lock, in every thread of cairnd and of the tools.
//
// A close goes before every open waiting: an image context (a copy of the
// client's whole configuration, caches) stays in memory until its close
// gets the lock, and with a thousand volumes syncing, hundreds of them
// queued behind new opens made the daemon's peak RSS.
class ImageContextHold {
 public:
  explicit ImageContextHold(bool closing);
  ~ImageContextHold();
  ImageContextHold(const ImageContextHold&) = delete;
  ImageContextHold& operator=(const ImageContextHold&) = delete;
};

// Holds the gate while an image context is made (an open, a create) or,
// with `closing`, dropped.
ImageContextHold ImageContextLock(bool closing = false);

// An open librbd image handle, closed when the last user lets go.
class Image {
 public:
  explicit Image(rbd_image_t h) : h_(h) {}
  ~Image() {
    const auto lock = ImageContextLock(/*closing=*/true);
    rbd_close(h_);
  }
  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;
  rbd_image_t get() const { return h_; }

 private:
  rbd_image_t h_;
};

// A watch on an image header: the client's global id and the watch's cookie.
using WatcherId = std::pair<uint64_t, uint64_t>;

// Level-1 diff windows span this many objects (a bounded list of changed
// objects per window; one object-map load per window).
inline constexpr uint64_t kCoarseWindowObjects = 64 * 1024;
// Exact diffs run over at most this many bytes per call (bounded extent
// lists; no long stall between two calls of the caller's fn).
inline constexpr uint64_t kFineWindow = 64ull << 20;
// After a snapshot, clients that began watching the image's header since
// just before it are told of it again, round after round while new ones
// appear (at most kSettleRounds notifications, each waiting up to
// kNotifyTimeout); the snapshot is then listed no sooner than kSettleFloor
// after it was taken and kSettleDrain after the last notification.
inline constexpr std::chrono::milliseconds kSettleFloor{50};
inline constexpr std::chrono::milliseconds kSettleDrain{20};
inline constexpr int kSettleRounds = 8;
inline constexpr std::chrono::milliseconds kNotifyTimeout{5000};
// Copy: pieces in flight and their size.
inline constexpr size_t kCopySlots = 8;
inline constexpr uint64_t kCopyPiece = 4ull << 20;

// --- Image metadata (rbd_image.cc) --------------------------------------------

// "pool/image" or "pool/image@snap", for messages.
std::string ImageSpec(const std::string& pool, const std::string& image,
                      const std::string& snap = "");
// Opens pool/image at `snap` (the head if empty). A share of a group
// snapshot (IsGroupSnapName) is opened read-only whatever `read_only` says:
// librbd opens at user snapshots by name only, so the image is opened at
// its head and moved to the share by id.
StatusOr<std::shared_ptr<Image>> OpenImage(const RadosIoCtx& io, const std::string& image,
                                           const std::string& snap, bool read_only);
// The image's id: unlike its name, never given to another image.
StatusOr<std::string> ImageId(rbd_image_t h, const std::string& spec);
StatusOr<uint64_t> ImageSize(rbd_image_t h, const std::string& spec);
// librbd's snapshot argument: null for the head.
const char* SnapOrNull(const std::string& snap);
// One snapshot as rbd_snap_list lists it: every namespace (user, group,
// trash, mirror), under librbd's own name (".group.<pool>_<group id>_<id>"
// for a share of a group snapshot).
struct RawSnap {
  uint64_t id = 0;
  uint64_t size = 0;
  std::string name;
};
// Every snapshot of the image through its handle, in id order.
StatusOr<std::vector<RawSnap>> ListAllSnapsOf(rbd_image_t h, const std::string& spec);
// The image's user snapshots through its handle, in id order (not the
// shares of group snapshots, nor trash or mirror snapshots: librbd removes,
// protects and clones by name only user snapshots).
StatusOr<std::vector<SnapInfo>> ListSnapsOf(rbd_image_t h, const std::string& spec);
// The id of snapshot `snap` through the handle: a user snapshot, or the
// share of group snapshot G named GroupSnapName(G). kNotFound if there is
// none. Cost: none for a user snapshot (librbd knows it); for a share, two
// RADOS reads per share looked at, newest first.
StatusOr<uint64_t> SnapIdOf(rbd_image_t h, const std::string& snap, const std::string& spec);
StatusOr<bool> IsProtected(rbd_image_t h, const std::string& spec, const std::string& snap);
// How many images are cloned from image@snap (trashed ones included).
StatusOr<size_t> CountClones(const RadosIoCtx& io, const std::string& image,
                             const std::string& snap);
// The error of a snapshot that `clones` clones depend on.
Status ClonesDependOn(const std::string& spec, size_t clones);

// --- cls_rbd over RADOS (rbd_image.cc) -----------------------------------------

inline constexpr uint64_t kNoSnap = UINT64_MAX - 1;  // CEPH_NOSNAP: the head

// A call of a cls_rbd method on an image's header (see CallHeader).
struct HeaderCall {
  const char* method;
  uint64_t snap_id;  // the input: kNoSnap for the head
  std::string out;   // the answer
};
// Calls of cls_rbd methods on an image's header, in one RADOS op. With
// `missing`, a call that finds no such thing (ENOENT: a snapshot removed)
// is marked there instead of failing them all.
Status CallHeader(rados_ioctx_t io, const std::string& header, std::span<HeaderCall> calls,
                  const std::string& spec, std::vector<int>* missing = nullptr);
// A u64 answer of cls_rbd (flags, features), little-endian.
StatusOr<uint64_t> DecodeFlags(std::string_view out, const std::string& header);
// The answer of cls_rbd get_snapcontext: the seq and the snapshot ids.
StatusOr<std::pair<uint64_t, std::vector<uint64_t>>> DecodeSnapContext(std::string_view out,
                                                                       const std::string& spec);
// The image's snapshot context (seq, snapshot ids) from its header.
StatusOr<std::pair<uint64_t, std::vector<uint64_t>>> ReadSnapContext(rados_ioctx_t io,
                                                                     const std::string& header,
                                                                     const std::string& spec);
// The id of the image named `name` (rbd_id.<name>), or kNotFound.
StatusOr<std::string> ReadImageId(rados_ioctx_t io, const std::string& name,
                                  const std::string& spec);
// The image's user snapshots and its shares of complete group snapshots
// (named GroupSnapName(group snapshot)), in id order, from its header.
// Trash and mirror snapshots are left out.
StatusOr<std::vector<SnapInfo>> ListSnapsOfHeader(rados_ioctx_t io, const std::string& id,
                                                  const std::string& spec);

// Reads little-endian values and Ceph-encoded strings out of a cls answer
// or an omap value.
class ClsReader {
 public:
  explicit ClsReader(std::string_view in) : in_(in) {}
  bool U8(uint8_t* v) { return Take(v, 1); }
  bool U32(uint32_t* v);
  bool U64(uint64_t* v);
  bool String(std::string* v);
  // A versioned struct's header (ENCODE_START): version, compat, length.
  // Returns where the struct ends.
  bool Struct(size_t* end);
  void Seek(size_t at) { at_ = at; }

 private:
  bool Take(void* v, size_t n);
  std::string_view in_;
  size_t at_ = 0;
};

// --- Groups (rbd_group.cc) -----------------------------------------------------

// What an image's header records of one of its shares of a group snapshot
// (cls_rbd GroupSnapshotNamespace).
struct GroupShareRef {
  int64_t group_pool = -1;
  std::string group_id;
  std::string group_snap_id;
};
// The names the shares `refs` of the image `spec` are listed under:
// GroupSnapName(name of the group snapshot) if it is complete, nullopt if
// it is gone or incomplete (being taken, or a take that died midway): such a
// share is no instant of the group; so are the shares of a group whose
// header cannot be read or decoded (logged). One omap read per group.
StatusOr<std::vector<std::optional<std::string>>> NameGroupShares(
    rados_ioctx_t io, const std::vector<GroupShareRef>& refs, const std::string& spec);

// --- I/O (rbd_io.cc) ---------------------------------------------------------

// Copies the allocated data of `src` (read-only, at its snapshot) into the
// fresh image `dst`, kCopySlots pieces in flight.
Status CopyData(rbd_image_t src, rbd_image_t dst, const std::string& pool,
                const std::string& src_image, const std::string& snap, const std::string& dst_spec,
                uint64_t size, const ProgressFn& progress);

// --- Listing changes (rbd_diff.cc) ----------------------------------------------

// Lists the diff from `from_snap` ("" = the empty image) to the point `h`
// is open at (`to_snap`, "" = the head). `h` is the caller's: its snapshot
// is moved and put back before the listing, so no I/O may be in flight on
// it until this returns or calls `fn` (RbdVolume::DiffExtents).
// `whole_changed`: every object the object maps flag goes whole, as at
// `to_snap` (see "Settling a snapshot").
Status DiffImage(rbd_image_t h, const std::string& pool, const std::string& image,
                 const std::string& from_snap, const std::string& to_snap,
                 const std::function<Status(const Extent&)>& fn, bool whole_changed = false);

// --- Snapshots (rbd_snapshots.cc) ---------------------------------------------

struct Settled;

// Settles one snapshot of one image (see "Settling a snapshot"), in two
// steps around taking it. The caller keeps `h` open until Finish returns.
class SnapSettler {
 public:
  // Just before the snapshot: lists who watches the image and tells `book`.
  SnapSettler(rbd_image_t h, const RadosIoCtx& io, SettleBook& book, std::string image,
              std::string spec);
  // Once the snapshot exists (`snap_id`, or why its id is unknown): tells
  // the clients that began watching since, and returns no sooner than the
  // settling ends; then records in the book what it saw. Its failures are
  // logged, not returned: the snapshot exists, and the diff from it sends
  // whole the objects that changed.
  void Finish(const StatusOr<uint64_t>& snap_id, const std::string& snap_spec);

 private:
  // `w` but this process's own watches: its handles come and go with every
  // epoch, and it knows of every snapshot it takes.
  std::set<WatcherId> Others(std::set<WatcherId> w) const;

  rbd_image_t h_;
  const RadosIoCtx& io_;
  SettleBook& book_;
  const std::string image_;
  const std::string spec_;
  const uint64_t self_;  // this process's RADOS client id
  StatusOr<std::set<WatcherId>> before_;
};

// Per image, the snapshots (by id) after which clients may have written
// with a snapshot context that lacks them (see "Settling a snapshot"), and
// who watched the newest one when its settling ended. Only what this
// process saw: snapshots taken before it started count as settled. The
// watchers given leave out this process's own (its handles come and go
// with every epoch, and it knows of every snapshot it takes).
// Thread-safe.
class SettleBook {
 public:
  // Just before a snapshot of `image`: a client watching now that was not
  // when the newest snapshot settled may have opened it before that
  // snapshot. Null `before`: the watchers could not be listed.
  void BeforeSnapshot(const std::string& image, const std::set<WatcherId>* before);
  // Snapshot `id` of `image` settled: `settled` null if that failed.
  void AfterSettling(const std::string& image, uint64_t id, const Settled* settled);
  // Whether a snapshot with id in [from, to) is unsettled.
  bool AnyUnsettled(const std::string& image, uint64_t from, uint64_t to) const;
  void Forget(const std::string& image, uint64_t id);
  // The same for whichever image has snapshot `id` (ids are unique in a pool).
  void Forget(uint64_t id);

 private:
  struct Entry {
    uint64_t newest = 0;
    std::set<WatcherId> watchers;
    std::set<uint64_t> unsettled;
  };
  mutable std::mutex mu_;
  std::map<std::string, Entry> images_;
};

}  // namespace cairn::rbd_internal
