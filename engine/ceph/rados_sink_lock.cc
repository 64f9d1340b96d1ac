#include "engine/ceph/rados_sink_lock.h"

#include <fmt/format.h>

#include <cerrno>
#include <string_view>
#include <utility>

namespace cairn {
namespace {

constexpr char kTag[] = "cairn";
// One cookie for every sink: the OSD tells holders apart by their entity.
constexpr char kCookie[] = "cairnd";

// The NUL-separated strings of a rados_list_lockers buffer.
std::vector<std::string> SplitNul(const std::vector<char>& buf, size_t len) {
  std::vector<std::string> out;
  std::string_view rest(buf.data(), std::min(len, buf.size()));
  while (!rest.empty()) {
    const size_t nul = rest.find('\0');
    out.emplace_back(rest.substr(0, nul));
    if (nul == std::string_view::npos) break;
    rest.remove_prefix(nul + 1);
  }
  return out;
}

}  // namespace

StatusOr<std::unique_ptr<RadosSinkLock>> RadosSinkLock::Open(std::shared_ptr<RadosIoCtx> io,
                                                             std::string object,
                                                             std::string description) {
  ASSIGN_OR_RETURN(std::string addr, io->cluster().ClientAddress());
  return std::unique_ptr<RadosSinkLock>(
      new RadosSinkLock(std::move(io), std::move(object), std::move(description), std::move(addr)));
}

RadosSinkLock::RadosSinkLock(std::shared_ptr<RadosIoCtx> io, std::string object,
                             std::string description, std::string self_addr)
    : io_(std::move(io)),
      object_(std::move(object)),
      description_(std::move(description)),
      self_addr_(std::move(self_addr)),
      spec_(fmt::format("lock {} on {}/{}", kName, io_->pool(), object_)) {}

StatusOr<std::vector<SinkLockHolder>> RadosSinkLock::Holders() {
  size_t sizes[4] = {64, 256, 256, 256};  // tag, clients, cookies, addrs
  for (int attempt = 0; attempt < 4; ++attempt) {
    std::vector<char> tag(sizes[0]), clients(sizes[1]), cookies(sizes[2]), addrs(sizes[3]);
    int exclusive = 0;
    const ssize_t n = rados_list_lockers(io_->get(), object_.c_str(), kName, &exclusive, tag.data(),
                                         &sizes[0], clients.data(), &sizes[1], cookies.data(),
                                         &sizes[2], addrs.data(), &sizes[3]);
    if (n == -ERANGE) continue;  // the sizes now say what is needed
    if (n == -ENOENT) return std::vector<SinkLockHolder>();
    if (n < 0) return ErrnoStatus(static_cast<int>(n), "listing the holders of the " + spec_);
    const auto c = SplitNul(clients, sizes[1]);
    const auto k = SplitNul(cookies, sizes[2]);
    const auto a = SplitNul(addrs, sizes[3]);
    if (c.size() < static_cast<size_t>(n) || k.size() < c.size() || a.size() < c.size()) {
      return Internal(fmt::format("the holders of the {}: librados listed {} but gave {} names",
                                  spec_, n, c.size()));
    }
    std::vector<SinkLockHolder> out;
    for (ssize_t i = 0; i < n; ++i) out.push_back({c[i], k[i], PlainClientAddr(a[i])});
    return out;
  }
  return Internal("listing the holders of the " + spec_ + ": the list kept growing");
}

Status RadosSinkLock::Take() {
  const int rc = rados_lock_exclusive(io_->get(), object_.c_str(), kName, kCookie,
                                      description_.c_str(), nullptr, 0);
  if (rc == 0 || rc == -EEXIST) return OkStatus();  // EEXIST: this connection holds it
  if (rc == -EBUSY) return Aborted("the " + spec_ + " is held by another client");
  return ErrnoStatus(rc, "taking the " + spec_);
}

Status RadosSinkLock::Break(const SinkLockHolder& holder) {
  const int rc = rados_break_lock(io_->get(), object_.c_str(), kName, holder.client.c_str(),
                                  holder.cookie.c_str());
  if (rc == 0 || rc == -ENOENT) return OkStatus();
  return ErrnoStatus(
      rc, fmt::format("breaking the {} held by {} ({})", spec_, holder.client, holder.addr));
}

Status RadosSinkLock::Release() {
  const int rc = rados_unlock(io_->get(), object_.c_str(), kName, kCookie);
  if (rc == 0 || rc == -ENOENT) return OkStatus();
  return ErrnoStatus(rc, "giving up the " + spec_);
}

}  // namespace cairn
