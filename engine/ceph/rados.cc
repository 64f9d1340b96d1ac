// RbdCluster and RadosIoCtx: one connection to a Ceph cluster, and its pools.

#include "engine/ceph/rados.h"

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
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/ceph/rados_kv_store.h"
#include "engine/ceph/rbd_volume.h"

namespace cairn {

using namespace rbd_internal;  // the adapters' shared helpers (rbd_internal.h)

// --- RbdCluster --------------------------------------------------------------

RbdCluster::RbdCluster(rados_t rados, std::string conf_path, std::string client_name)
    : rados_(rados), conf_path_(std::move(conf_path)), client_name_(std::move(client_name)) {}

RbdCluster::~RbdCluster() { rados_shutdown(rados_); }

StatusOr<std::shared_ptr<RbdCluster>> RbdCluster::Connect(const std::string& conf_path,
                                                          const std::string& client_id,
                                                          const std::string& keyring_path,
                                                          std::chrono::seconds timeout) {
  const std::string client = "client." + client_id;
  rados_t r = nullptr;
  int rc = rados_create2(&r, "ceph", client.c_str(), 0);
  if (rc < 0) return ErrnoStatus(rc, "creating a RADOS handle for " + client);
  auto fail = [&](Status st) {
    rados_shutdown(r);
    return st;
  };
  rc = rados_conf_read_file(r, conf_path.c_str());
  if (rc < 0) {
    return fail(FailedPrecondition(fmt::format("cannot read the Ceph config {}: {} (errno {})",
                                               conf_path, std::strerror(-rc), -rc)));
  }
  const std::string secs = std::to_string(std::max<int64_t>(1, timeout.count()));
  std::vector<std::pair<const char*, std::string>> settings = {
      // Bounded waits: a dead cluster must give errors, not hangs.
      {"client_mount_timeout", secs},
      {"rados_mon_op_timeout", secs},
      {"rados_osd_op_timeout", secs},
      // A config written for daemons may give every process one socket
      // path; clients side by side would then fail with "File exists".
      {"admin_socket", ""},
      // Cairn bounds its own I/O (window x block_size) and flushes where it
      // needs durability; librbd's cache would copy every block once more
      // and hold up to 32 MiB per open image (1 TiB or 1 GiB alike).
      {"rbd_cache", "false"},
      // Writes go to the OSDs from Cairn's own buffers, not from a copy:
      // each buffer is left untouched until its write completes, and librbd
      // holds a write's completion until its last reference to the buffer
      // is gone.
      {"rbd_disable_zero_copy_writes", "false"},
  };
  if (!keyring_path.empty()) settings.emplace_back("keyring", keyring_path);
  for (const auto& [option, value] : settings) {
    if (rc = rados_conf_set(r, option, value.c_str()); rc < 0) {
      return fail(ErrnoStatus(rc, fmt::format("setting {} for {}", option, client)));
    }
  }
  std::string keyring = keyring_path;
  if (keyring.empty()) {
    char buf[1024] = {};
    keyring = rados_conf_get(r, "keyring", buf, sizeof buf) == 0 ? buf : "(unknown)";
  }

  rc = rados_connect(r);
  if (rc == -EACCES || rc == -EPERM) {
    return fail(FailedPrecondition(fmt::format(
        "connecting to the cluster of {} as {}: the cluster refused the key (errno {}); check "
        "that keyring {} holds the key of {} and that this user exists with its caps",
        conf_path, client, -rc, keyring, client)));
  }
  if (rc == -ENOENT) {
    return fail(FailedPrecondition(fmt::format(
        "connecting to the cluster of {} as {}: no key found for {} in keyring {}; check the "
        "keyring path and its content",
        conf_path, client, client, keyring)));
  }
  if (rc == -ETIMEDOUT) {
    return fail(Unavailable(fmt::format(
        "connecting to the cluster of {} as {}: no monitor answered within {} s; check that the "
        "cluster runs and that the mon host in {} is right",
        conf_path, client, secs, conf_path)));
  }
  if (rc < 0) {
    return fail(
        ErrnoStatus(rc, fmt::format("connecting to the cluster of {} as {}", conf_path, client)));
  }
  return std::shared_ptr<RbdCluster>(new RbdCluster(r, conf_path, client));
}

StatusOr<std::string> RbdCluster::ClientAddress() const {
  char* raw = nullptr;
  if (int rc = rados_getaddrs(rados_, &raw); rc < 0) {
    return ErrnoStatus(rc, "getting the client address of " + client_name_);
  }
  std::string addrs = raw != nullptr ? raw : "";
  std::free(raw);
  std::string a = PlainClientAddr(addrs);
  if (a.empty() || a.find('/') == std::string::npos) {
    return Internal(
        fmt::format("{} has no usable client address (librados says '{}')", client_name_, addrs));
  }
  return a;
}

std::string PlainClientAddr(std::string_view a) {
  // Usually one address; an address vector "[v2:IP:0/N,v1:IP:0/N]" names one
  // client too: its first entry, without the type, is what the OSDs list.
  if (a.starts_with('[')) {
    a.remove_prefix(1);
    a = a.substr(0, std::min(a.find(','), a.find(']')));
  }
  for (std::string_view type : {"any:", "v1:", "v2:"}) {
    if (a.starts_with(type)) a.remove_prefix(type.size());
  }
  return std::string(a);
}

Status RbdCluster::Blocklist(const std::string& addr, std::chrono::seconds expire) {
  std::string arg = addr;  // the C API takes a char*
  const uint32_t secs = static_cast<uint32_t>(std::clamp<int64_t>(expire.count(), 1, UINT32_MAX));
  const int rc = rados_blocklist_add(rados_, arg.data(), secs);
  if (rc == -EACCES || rc == -EPERM) {
    return FailedPrecondition(fmt::format(
        "blocklisting client {} on the cluster of {}: {} may not (errno {}); it needs the mon "
        "cap 'profile rbd' (or 'allow command \"osd blocklist\" with blocklistop=add'), e.g. "
        "ceph auth caps {} mon 'profile rbd' osd 'profile rbd'",
        addr, conf_path_, client_name_, -rc, client_name_));
  }
  if (rc == -EINVAL) {
    return InvalidArgument(
        fmt::format("blocklisting '{}' on the cluster of {}: not a client "
                    "address",
                    addr, conf_path_));
  }
  if (rc < 0) {
    return ErrnoStatus(
        rc, fmt::format("blocklisting client {} on the cluster of {}", addr, conf_path_));
  }
  return OkStatus();
}

StatusOr<bool> RbdCluster::Blocklisted(const std::string& pool, const std::string& object) {
  ASSIGN_OR_RETURN(std::shared_ptr<RadosIoCtx> io, OpenIoCtx(pool));
  uint64_t size = 0;
  time_t mtime = 0;
  const int rc = rados_stat(io->get(), object.c_str(), &size, &mtime);
  if (rc == -ESHUTDOWN) return true;  // EBLOCKLISTED
  if (rc == 0 || rc == -ENOENT) return false;
  return ErrnoStatus(rc, fmt::format("checking whether {} is blocklisted (stat of {}/{})",
                                     client_name_, pool, object));
}

StatusOr<std::shared_ptr<RadosIoCtx>> RbdCluster::OpenIoCtx(const std::string& pool) {
  rados_ioctx_t io = nullptr;
  const int rc = rados_ioctx_create(rados_, pool.c_str(), &io);
  if (rc == -ENOENT) {
    return NotFound(fmt::format("pool {} does not exist on cluster {}", pool, conf_path_));
  }
  if (rc < 0) {
    return ErrnoStatus(rc, fmt::format("opening pool {} on cluster {}", pool, conf_path_));
  }
  return std::make_shared<RadosIoCtx>(shared_from_this(), io, pool);
}

StatusOr<std::shared_ptr<RbdPool>> RbdCluster::OpenPool(const std::string& pool,
                                                        const RbdPoolOptions& options) {
  ASSIGN_OR_RETURN(std::shared_ptr<RadosIoCtx> io, OpenIoCtx(pool));
  return std::make_shared<RbdPool>(std::move(io), options);
}

StatusOr<std::shared_ptr<KvStore>> RbdCluster::OpenKvStore(const std::string& pool,
                                                           const std::string& object) {
  ASSIGN_OR_RETURN(std::shared_ptr<RadosIoCtx> io, OpenIoCtx(pool));
  return std::shared_ptr<KvStore>(std::make_shared<RadosKvStore>(std::move(io), object));
}

RadosIoCtx::RadosIoCtx(std::shared_ptr<RbdCluster> cluster, rados_ioctx_t io, std::string pool)
    : cluster_(std::move(cluster)), io_(io), pool_(std::move(pool)) {}

RadosIoCtx::~RadosIoCtx() { rados_ioctx_destroy(io_); }

}  // namespace cairn
