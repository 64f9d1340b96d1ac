#include "engine/ceph/rados_kv_store.h"

#include <fmt/format.h>

#include <cerrno>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "engine/ceph/omap_read.h"

namespace cairn {
namespace {

constexpr uint64_t kPage = 512;  // omap pairs per read

struct WriteOp {
  rados_write_op_t op = rados_create_write_op();
  ~WriteOp() { rados_release_write_op(op); }
};

}  // namespace

RadosKvStore::RadosKvStore(std::shared_ptr<RadosIoCtx> io, std::string object)
    : io_(std::move(io)),
      object_(std::move(object)),
      spec_(fmt::format("{}/{}", io_->pool(), object_)) {}

namespace {

// Adds the omap sets and removals to `w` (librados copies keys and values
// into the op). kInvalidArgument for a key holding a NUL byte.
Status AddChanges(WriteOp& w, const std::map<std::string, std::string>& set,
                  const std::vector<std::string>& remove, const std::string& spec) {
  std::vector<const char*> keys, vals, rm_keys;
  std::vector<size_t> key_lens, val_lens, rm_lens;
  for (const auto& [k, v] : set) {
    if (k.find('\0') != std::string::npos) {
      return InvalidArgument(fmt::format("committing to {}: a key holds a NUL byte", spec));
    }
    keys.push_back(k.data());
    key_lens.push_back(k.size());
    vals.push_back(v.data());
    val_lens.push_back(v.size());
  }
  for (const auto& k : remove) {
    rm_keys.push_back(k.data());
    rm_lens.push_back(k.size());
  }
  if (!keys.empty()) {
    rados_write_op_omap_set2(w.op, keys.data(), vals.data(), key_lens.data(), val_lens.data(),
                             keys.size());
  }
  if (!rm_keys.empty()) {
    rados_write_op_omap_rm_keys2(w.op, rm_keys.data(), rm_lens.data(), rm_keys.size());
  }
  return OkStatus();
}

}  // namespace

Status RadosKvStore::Commit(const std::map<std::string, std::string>& set,
                            const std::vector<std::string>& remove) {
  WriteOp w;
  rados_write_op_create(w.op, LIBRADOS_CREATE_IDEMPOTENT, nullptr);
  RETURN_IF_ERROR(AddChanges(w, set, remove, spec_));
  const int rc =
      rados_write_op_operate(w.op, io_->get(), object_.c_str(), nullptr, LIBRADOS_OPERATION_NOFLAG);
  if (rc < 0) {
    return ErrnoStatus(rc, fmt::format("committing {} set and {} removed keys to {}", set.size(),
                                       remove.size(), spec_));
  }
  return OkStatus();
}

Status RadosKvStore::CommitIf(const std::string& key, const std::optional<std::string>& expected,
                              const std::map<std::string, std::string>& set,
                              const std::vector<std::string>& remove) {
  if (expected && expected->empty()) {
    return InvalidArgument(
        fmt::format("committing to {} if key '{}' holds a value: the value is empty", spec_, key));
  }
  if (key.find('\0') != std::string::npos) {
    return InvalidArgument(fmt::format("committing to {}: a key holds a NUL byte", spec_));
  }
  // The comparison needs the object (on a missing one the op fails with
  // ENOENT): an empty object is an empty store, so make sure it exists.
  if (!expected) RETURN_IF_ERROR(Commit({}, {}));
  WriteOp w;
  int cmp_rc = 0;
  const std::string& want = expected ? *expected : std::string();
  rados_write_op_omap_cmp2(w.op, key.data(), LIBRADOS_CMPXATTR_OP_EQ, want.data(), key.size(),
                           want.size(), &cmp_rc);
  RETURN_IF_ERROR(AddChanges(w, set, remove, spec_));
  const int rc =
      rados_write_op_operate(w.op, io_->get(), object_.c_str(), nullptr, LIBRADOS_OPERATION_NOFLAG);
  if (rc == -ECANCELED || rc == -ENOENT) {
    return Aborted(
        fmt::format("committing to {}: key '{}' no longer holds the value expected", spec_, key));
  }
  if (rc < 0) {
    return ErrnoStatus(rc, fmt::format("committing {} set and {} removed keys to {} if key '{}' "
                                       "holds the value expected",
                                       set.size(), remove.size(), spec_, key));
  }
  return OkStatus();
}

StatusOr<std::map<std::string, std::string>> RadosKvStore::Scan(const std::string& prefix) {
  std::map<std::string, std::string> out;
  std::string after;  // "" starts at the first key
  while (true) {
    OmapRead r;
    unsigned char more = 0;
    int prval = 0;
    rados_read_op_omap_get_vals2(r.op, after.c_str(), prefix.c_str(), kPage, &r.iter, &more,
                                 &prval);
    int rc = rados_read_op_operate(r.op, io_->get(), object_.c_str(), LIBRADOS_OPERATION_NOFLAG);
    if (rc == -ENOENT) return out;  // no object: an empty store
    if (rc == 0) rc = prval;
    if (rc < 0) {
      return ErrnoStatus(rc, fmt::format("scanning {} for prefix '{}'", spec_, prefix));
    }
    size_t n = 0;
    rc = r.ForEachValue([&](std::string_view key, std::string_view val) {
      after.assign(key);
      out.insert_or_assign(after, std::string(val));
      ++n;
      return true;
    });
    if (rc < 0) {
      return ErrnoStatus(rc, fmt::format("scanning {} for prefix '{}'", spec_, prefix));
    }
    if (!more || n == 0) return out;
  }
}

StatusOr<std::string> RadosKvStore::Get(const std::string& key) {
  OmapRead r;
  int prval = 0;
  const char* keys[] = {key.data()};
  const size_t lens[] = {key.size()};
  rados_read_op_omap_get_vals_by_keys2(r.op, keys, 1, lens, &r.iter, &prval);
  int rc = rados_read_op_operate(r.op, io_->get(), object_.c_str(), LIBRADOS_OPERATION_NOFLAG);
  if (rc == -ENOENT) return NotFound(fmt::format("no key '{}' in {} (no such object)", key, spec_));
  if (rc == 0) rc = prval;
  if (rc < 0) return ErrnoStatus(rc, fmt::format("reading key '{}' of {}", key, spec_));
  std::optional<std::string> found;
  rc = r.ForEachValue([&](std::string_view k, std::string_view v) {
    if (k == key) found.emplace(v);
    return !found;
  });
  if (rc < 0) return ErrnoStatus(rc, fmt::format("reading key '{}' of {}", key, spec_));
  if (found) return *found;
  return NotFound(fmt::format("no key '{}' in {}", key, spec_));
}

}  // namespace cairn
