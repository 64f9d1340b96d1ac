// VolumeConfig: how one volume replicates from its source, as the
// [volume NAME] section of cairnd.conf (engine/daemon/config.h) or a run-time
// registration gives it. docs/OPERATIONS.md documents every key.
//
// Thread-safety: a value.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/epoch/epoch.h"
#include "engine/link/codec_link.h"
#include "engine/replication/retention.h"

namespace cairn {

struct VolumeConfig {
  std::string id;
  std::string pool = "rbd";
  std::string image;
  std::string peer_host;
  uint16_t peer_port = 0;
  // The name the sink's certificate must carry (a DNS or IP
  // subjectAltName); empty: peer_host.
  std::string peer_name;
  std::string target_pool;                   // default: pool
  std::string target_image;                  // default: image
  std::chrono::milliseconds interval{5000};  // 0: on demand only
  uint32_t keep_snapshots = 0;               // older source snapshots kept beyond the base
  // ... and the newest older one of each of the last periods of each tier
  // (retention.h), by when it was taken: restore points at the source.
  std::vector<RetentionTier> snapshot_tiers;
  // While the sink cannot be reached the source goes on taking a snapshot
  // every `interval`; it keeps the newest `outage_snapshots` of them (1:
  // one coalesced epoch when the link returns; N: up to N points in time).
  uint32_t outage_snapshots = 1;
  // Largest data record (see kDefaultBlockSize).
  uint32_t block_size = kDefaultBlockSize;
  // The source's read memory for an epoch: window x block_size (see
  // kDefaultReadWindow).
  uint32_t window = kDefaultReadWindow;
  // How data records travel to a sink that takes them compressed
  // (codec_link.h): for links between sites slower than the volume's
  // share of a core.
  Compression compression = Compression::kNone;
  // A member of this consistency group (the RBD group of `pool` at the
  // source, GroupSource): its points are the group's instants. "": none.
  std::string group;
  // Its restore points' own retention at the sink (carried in Hello),
  // besides the sink's own [sink] keep_points and retention; none: those
  // alone.
  std::optional<RetentionRules> retention;
};

}  // namespace cairn
