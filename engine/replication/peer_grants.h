// Who may replicate into a sink: the [peer NAME] sections of cairnd.conf.
//
// A source is known by its certificate (Link::peer_names, after mutual TLS).
// A grant names one of those names and says which source site that peer
// may claim to be and which standby pools and volume ids it may write. A
// source that no grant allows is refused before the sink reads any state
// of the volume or replies with any of it.
//
// Thread-safety: values; AuthorizeSource is a pure function.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/status.h"

namespace cairn {

struct PeerGrant {
  std::string name;                          // a name its certificate carries
  std::string site;                          // the source site it may be
  std::vector<std::string> pools;            // standby pools; empty: every pool of the sink
  std::vector<std::string> volumes = {"*"};  // volume ids, as shell globs
};

// `grants`: nullopt when the sink's links are not authenticated ([tls]
// insecure = true): everyone is allowed. Otherwise kPermissionDenied
// unless a grant names one of `peer_names` and allows `site`, `pool` and
// `volume`; a peer without names is refused.
Status AuthorizeSource(const std::optional<std::vector<PeerGrant>>& grants,
                       const std::vector<std::string>& peer_names, std::string_view site,
                       std::string_view pool, std::string_view volume);

}  // namespace cairn
