// cairnd's configuration: an INI file, like ceph.conf and cinder.conf.
//
//   [cairnd]            site = a; control_socket = PATH; log_level = info;
//                       control_group; admin_group
//   [ceph]              conf = /etc/ceph/ceph.conf; client = admin; keyring = PATH;
//                       op_timeout = 30s
//   [sink]              listen = HOST:PORT; spool_dir = PATH; pools = rbd,volumes;
//                       spool_max_bytes = 0; keep_points = 0; window = 32;
//                       window_bytes = 32M
//   [source]            pools = rbd; peer = HOST:PORT; interval = 5s; keep_snapshots;
//                       outage_snapshots (volumes registered at run time)
//   [volume NAME]       pool; image; peer = HOST:PORT; target_pool; target_image;
//                       interval = 5s; keep_snapshots = 0; outage_snapshots = 1;
//                       block_size = 4M; window = 4; peer_name; group
//   [tls]               ca = PATH; cert = PATH; key = PATH; insecure = false
//   [peer NAME]         site = a; pools = rbd; volumes = * (a sink's grant to
//                       the source whose certificate carries NAME)
//
// Links between sites are mutual TLS unless [tls] says insecure = true; a
// sink then needs a [peer NAME] grant for each source that may write.
// A node is a sink if it has a [sink] section and a source for every
// [volume NAME] section; it may be both. docs/OPERATIONS.md documents every
// key. Unknown sections and keys are errors (a typo must not silently
// fall back to a default).
//
// Thread-safety: values.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/status.h"
#include "engine/link/tls.h"
#include "engine/replication/peer_grants.h"
#include "engine/replication/retention.h"
#include "engine/replication/volume_config.h"

namespace cairn {

struct CephConfig {
  std::string conf = "/etc/ceph/ceph.conf";
  std::string client = "admin";  // cephx user, without "client."
  std::string keyring;           // empty: from ceph.conf
  // Every mon and OSD operation (and the first connect) gives up after
  // this long: a cluster that does not answer gives errors, not hangs.
  std::chrono::seconds op_timeout{30};
};

struct SinkConfig {
  std::string listen_host = "127.0.0.1";
  uint16_t listen_port = 7410;
  std::string spool_dir = "/var/lib/cairn/spool";
  std::vector<std::string> pools = {"rbd"};
  // Largest spool file of one epoch, header included; 0: no limit but the
  // disk. A larger epoch is refused (ResourceExhausted) like a full disk.
  uint64_t spool_max_bytes = 0;
  // Restore points kept per volume: after each new point the oldest beyond
  // this many are removed (catalog record, then standby snapshot). 0: all
  // (asked for explicitly; the catalog and the snapshots then grow without
  // bound). Points are made only when the image changed.
  uint32_t keep_points = 24;
  // Retention tiers besides (`retention = 10m*6 1h*24 1d*365`): the newest
  // point of each of the last COUNT periods is kept too.
  std::vector<RetentionTier> retention_tiers;
  // Concurrent writes to a standby image while an epoch is applied, and
  // the bytes they hold at most (see kDefaultApplyWindow).
  uint32_t window = kDefaultApplyWindow;
  uint64_t window_bytes = kDefaultApplyWindowBytes;
};

struct TlsConfig {
  TlsFiles files;
  // Plaintext links: anyone who reaches the port may read and forge
  // epochs. Logged as an error at every start.
  bool insecure = false;
};

struct DaemonConfig {
  std::string site = "default";
  std::string control_socket = "/run/cairn/cairnd.sock";
  // The control socket is 0660 in this group (who may connect and read:
  // status, points); empty: 0600, cairnd's own user and root only.
  std::string control_group;
  // Who may also change (replicate, restore, register, unregister, promote,
  // release): root, cairnd's own user, and the members of this group.
  std::string admin_group;
  std::string log_level = "info";
  // Prometheus metrics over HTTP (GET /metrics) on this address; port 0:
  // none (metrics_listen unset).
  std::string metrics_host;
  uint16_t metrics_port = 0;
  // Buffer memory lent to the epochs in flight, all volumes together
  // (source read windows, sink apply windows and spool buffers): the
  // daemon's memory does not grow with the number of volumes syncing.
  uint64_t memory_budget = 128u << 20;
  // Bytes a second that all links to sinks carry together (link/paced_link.h),
  // compressed records as compressed; 0: no cap.
  uint64_t max_send_rate = 0;
  CephConfig ceph;
  std::optional<SinkConfig> sink;
  // [source]: volumes registered at run time (the Cinder shim) in these
  // pools replicate to `peer` with these settings.
  struct Source {
    std::vector<std::string> pools = {"rbd"};
    std::string peer_host;
    uint16_t peer_port = 0;
    std::chrono::milliseconds interval{5000};
    uint32_t keep_snapshots = 0;
    uint32_t outage_snapshots = 1;
    std::string peer_name;                         // see VolumeConfig::peer_name
    std::optional<RetentionRules> retention;       // registered volumes' default
    std::vector<RetentionTier> snapshot_tiers;     // as VolumeConfig's
    Compression compression = Compression::kNone;  // registered volumes'
  };
  std::optional<Source> source;
  std::vector<VolumeConfig> volumes;
  TlsConfig tls;
  std::vector<PeerGrant> peers;  // [peer NAME] sections: a sink's grants
};

// Parses INI text. `origin` names the file in errors, which read like
// "cairnd.conf:12: [volume v1] interval: '0.5x' is not a duration (use 5s, 500ms, 1m)".
StatusOr<DaemonConfig> ParseConfig(std::string_view text, std::string_view origin);
// Reads and parses a file. kNotFound if it does not exist.
StatusOr<DaemonConfig> LoadConfig(const std::string& path);

// "5s", "500ms", "1m", "2h", "0" -> milliseconds.
StatusOr<std::chrono::milliseconds> ParseDuration(std::string_view text);
// "4096", "64K", "1M", "1G" -> bytes.
StatusOr<uint64_t> ParseSize(std::string_view text);

}  // namespace cairn
