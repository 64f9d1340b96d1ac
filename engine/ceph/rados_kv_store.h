// RadosKvStore: the KvStore seam (engine/catalog/kv_store.h) as the omap of ONE
// RADOS object (e.g. "cairn.catalog") in a pool, so the catalog lives in the
// cluster and any replicator node can take over.
//
//  - Commit is one RADOS write operation (create-if-missing + omap set +
//    omap remove): the OSD applies all of it or none of it, even across a
//    crash. Within one Commit, a key both set and removed ends up removed.
//  - CommitIf adds an omap comparison (equal) of one key to that write
//    operation; expecting an absent key first creates the (empty) object,
//    which the comparison needs.
//  - Scan reads the omap in pages of 512 pairs (start_after + prefix
//    filter): one page is one consistent read, but a scan of more than 512
//    matching pairs may mix the states before and after a concurrent
//    commit.
//  - A missing object is an empty store: Scan returns nothing and Get
//    kNotFound; the first Commit creates it.
//  - Keys must not contain NUL bytes (paging passes them as C strings):
//    Commit refuses them with kInvalidArgument. Values may hold any bytes.
//  - The bytes of one Commit must fit one RADOS op (osd_max_write_size,
//    90 MB by default): a catalog, not a data store.
//
// Thread-safety: thread-safe (librados I/O contexts are).
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/catalog/kv_store.h"
#include "engine/ceph/rados.h"

namespace cairn {

class RadosKvStore final : public KvStore {
 public:
  // The store in the omap of `object` in the pool of `io`. Nothing is read
  // or created until the first call.
  RadosKvStore(std::shared_ptr<RadosIoCtx> io, std::string object);

  Status Commit(const std::map<std::string, std::string>& set,
                const std::vector<std::string>& remove) override;
  // One write op: omap comparison of `key` + sets + removals (the OSD
  // answers ECANCELED, nothing applied, if the comparison fails).
  Status CommitIf(const std::string& key, const std::optional<std::string>& expected,
                  const std::map<std::string, std::string>& set,
                  const std::vector<std::string>& remove) override;
  StatusOr<std::map<std::string, std::string>> Scan(const std::string& prefix) override;
  StatusOr<std::string> Get(const std::string& key) override;

  const std::string& object() const { return object_; }

 private:
  std::shared_ptr<RadosIoCtx> io_;
  const std::string object_;
  const std::string spec_;  // pool/object, for messages
};

}  // namespace cairn
