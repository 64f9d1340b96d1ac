#include "engine/replication/peer_grants.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <fnmatch.h>

#include <algorithm>

namespace cairn {
namespace {

bool Allows(const PeerGrant& g, std::string_view site, std::string_view pool,
            const std::string& volume) {
  if (g.site != site) return false;
  if (!g.pools.empty() && std::find(g.pools.begin(), g.pools.end(), pool) == g.pools.end()) {
    return false;
  }
  return std::any_of(g.volumes.begin(), g.volumes.end(), [&](const std::string& glob) {
    return fnmatch(glob.c_str(), volume.c_str(), 0) == 0;
  });
}

}  // namespace

Status AuthorizeSource(const std::optional<std::vector<PeerGrant>>& grants,
                       const std::vector<std::string>& peer_names, std::string_view site,
                       std::string_view pool, std::string_view volume) {
  if (!grants) return OkStatus();
  if (peer_names.empty()) {
    return PermissionDenied("the source is not authenticated (no certificate): links need TLS");
  }
  const std::string vol(volume);
  bool named = false;
  for (const PeerGrant& g : *grants) {
    if (std::find(peer_names.begin(), peer_names.end(), g.name) == peer_names.end()) continue;
    named = true;
    if (Allows(g, site, pool, vol)) return OkStatus();
  }
  if (!named) {
    return PermissionDenied(
        fmt::format("no [peer NAME] grant of this sink names the source's certificate ({})",
                    fmt::join(peer_names, ", ")));
  }
  return PermissionDenied(
      fmt::format("the grant of {} does not allow site '{}' to write volume '{}' in pool '{}'",
                  peer_names.front(), site, volume, pool));
}

}  // namespace cairn
