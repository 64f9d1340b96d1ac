// RadosSinkLock: the SinkLock seam (engine/catalog/sink_lock.h) as a RADOS
// exclusive lock (cls_lock, no expiry) named "cairn.sink" on a pool's
// catalog object. The OSD records the entity and address of the connection
// that takes it, so `rados -p POOL lock info cairn.catalog cairn.sink` shows
// the running sink, and no client can take it in another's name.
//
// Thread-safety: thread-safe (librados I/O contexts are).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/catalog/sink_lock.h"
#include "engine/ceph/rados.h"

namespace cairn {

class RadosSinkLock final : public SinkLock {
 public:
  static constexpr char kName[] = "cairn.sink";

  // The lock on `object` in the pool of `io`, as taken by `io`'s
  // connection; `description` (e.g. the sink's pid and host) is stored
  // with it for operators. Reads the connection's address.
  static StatusOr<std::unique_ptr<RadosSinkLock>> Open(std::shared_ptr<RadosIoCtx> io,
                                                       std::string object, std::string description);

  StatusOr<std::vector<SinkLockHolder>> Holders() override;
  Status Take() override;
  Status Break(const SinkLockHolder& holder) override;
  Status Release() override;
  const std::string& self_addr() const override { return self_addr_; }

 private:
  RadosSinkLock(std::shared_ptr<RadosIoCtx> io, std::string object, std::string description,
                std::string self_addr);

  std::shared_ptr<RadosIoCtx> io_;
  const std::string object_;
  const std::string description_;
  const std::string self_addr_;
  const std::string spec_;  // "lock cairn.sink on pool/object", for messages
};

}  // namespace cairn
