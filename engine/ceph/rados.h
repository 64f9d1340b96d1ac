// RbdCluster and RadosIoCtx: one connection (rados_t) to a Ceph cluster and
// an I/O context on one of its pools. The cluster's mon and OSD operations
// are bounded by a timeout, so a dead cluster gives kUnavailable rather than
// a hang; it opens pools (RadosIoCtx) and, on them, RbdPools
// (engine/ceph/rbd_volume.h) and KvStores (engine/ceph/rados_kv_store.h).
//
// Every librados error becomes a Status through ErrnoStatus.
//
// Thread-safety: RbdCluster and RadosIoCtx are thread-safe, as librados is.
#pragma once

#include <rados/librados.h>
#include <rbd/librbd.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "engine/base/status.h"
#include "engine/catalog/kv_store.h"

namespace cairn {

class RbdPool;
class RadosIoCtx;

inline constexpr uint64_t kRbdDefaultFeatures = RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK |
                                                RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF |
                                                RBD_FEATURE_DEEP_FLATTEN;

struct RbdPoolOptions {
  // Features of the images this pool makes (Create, Clone, Copy). Keep
  // object-map and fast-diff: without them DiffExtents costs one RADOS op
  // per object of the image.
  uint64_t features = kRbdDefaultFeatures;
  // log2 of the object size of images made by Create: 22 is 4 MiB. Copy
  // keeps the source's.
  int order = 22;
};

// A connection to one Ceph cluster.
class RbdCluster : public std::enable_shared_from_this<RbdCluster> {
 public:
  static constexpr std::chrono::seconds kDefaultTimeout{30};

  // Connects as client.`client_id` to the cluster that `conf_path`
  // describes, with the key from `keyring_path` (or, if empty, the keyring
  // that the config names). Connecting, and every later mon and OSD
  // operation, gives up after `timeout`. The client's admin socket is
  // turned off, so that many clients can run side by side.
  // Errors: kFailedPrecondition if the config cannot be read, the keyring
  // is missing or the cluster refuses the key (the message names the user
  // and the keyring: an operator must fix them); kUnavailable if no monitor
  // answered within `timeout`.
  static StatusOr<std::shared_ptr<RbdCluster>> Connect(
      const std::string& conf_path, const std::string& client_id = "admin",
      const std::string& keyring_path = "", std::chrono::seconds timeout = kDefaultTimeout);

  ~RbdCluster();
  RbdCluster(const RbdCluster&) = delete;
  RbdCluster& operator=(const RbdCluster&) = delete;

  // kNotFound ("pool X does not exist on cluster CONF") if there is no such
  // pool.
  StatusOr<std::shared_ptr<RadosIoCtx>> OpenIoCtx(const std::string& pool);
  // The images of `pool`. Errors as OpenIoCtx.
  StatusOr<std::shared_ptr<RbdPool>> OpenPool(const std::string& pool,
                                              const RbdPoolOptions& options = {});
  // A RadosKvStore (engine/ceph/rados_kv_store.h) in the omap of `object` in
  // `pool`. Errors as OpenIoCtx.
  StatusOr<std::shared_ptr<KvStore>> OpenKvStore(const std::string& pool,
                                                 const std::string& object);

  // This connection's RADOS client address, e.g. "127.0.0.1:0/3215435001":
  // what the watchers and lockers of an image it opens list, and what
  // Blocklist takes. Unique to the connection (the part after '/' is random).
  StatusOr<std::string> ClientAddress() const;
  // Fences the client at `addr` (another connection; e.g. a cairnd killed
  // with -9) for `expire`: the OSDs drop its watches at once, so its
  // exclusive locks can be broken without waiting for the OSD to time the
  // watches out (osd_client_watch_timeout, 30 s), and refuse its I/O.
  // Returns once this connection has the OSD map with the entry.
  // kFailedPrecondition naming the cap if this user may not blocklist (needs
  // mon 'profile rbd', or 'allow command "osd blocklist"'); kInvalidArgument
  // if `addr` is not a client address.
  Status Blocklist(const std::string& addr, std::chrono::seconds expire);
  // True if the OSDs refuse this connection because another client
  // blocklisted it (a stat of `object` in `pool` answers EBLOCKLISTED).
  StatusOr<bool> Blocklisted(const std::string& pool, const std::string& object);

  rados_t handle() const { return rados_; }
  const std::string& conf_path() const { return conf_path_; }
  // "client.admin"
  const std::string& client_name() const { return client_name_; }

 private:
  RbdCluster(rados_t rados, std::string conf_path, std::string client_name);

  rados_t rados_;
  const std::string conf_path_;
  const std::string client_name_;
};

// A client address as librados prints it ("v1:IP:0/N", "[v2:..,v1:..]")
// in the form the OSDs list and Blocklist takes ("IP:0/N").
std::string PlainClientAddr(std::string_view addr);

// An I/O context on one pool. Keeps its cluster connected while it lives.
class RadosIoCtx {
 public:
  RadosIoCtx(std::shared_ptr<RbdCluster> cluster, rados_ioctx_t io, std::string pool);
  ~RadosIoCtx();
  RadosIoCtx(const RadosIoCtx&) = delete;
  RadosIoCtx& operator=(const RadosIoCtx&) = delete;

  rados_ioctx_t get() const { return io_; }
  const std::string& pool() const { return pool_; }
  const RbdCluster& cluster() const { return *cluster_; }

 private:
  std::shared_ptr<RbdCluster> cluster_;
  rados_ioctx_t io_;
  const std::string pool_;
};

}  // namespace cairn
