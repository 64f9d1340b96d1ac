#include "engine/daemon/config.h"

#include <fmt/format.h>
#include <ini.h>

#include <algorithm>
#include <charconv>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "engine/catalog/catalog.h"
#include "engine/link/tcp_link.h"

namespace cairn {
namespace {

struct Entry {
  std::string value;
};
struct Parsed {
  // section -> key -> entry, plus the order sections appear in.
  std::map<std::string, std::map<std::string, Entry>> sections;
  std::vector<std::string> order;
  std::string error;
};

int Handler(void* user, const char* section, const char* name, const char* value) {
  auto* p = static_cast<Parsed*>(user);
  if (!p->sections.count(section)) {
    p->sections[section];
    p->order.push_back(section);
  }
  if (name == nullptr) return 1;  // a section line with no keys yet
  auto& keys = p->sections[section];
  if (keys.count(name)) {
    p->error = fmt::format(" [{}] {} is set twice", section, name);
    return 0;
  }
  keys[name] = Entry{value ? value : ""};
  return 1;
}

std::string Trim(std::string_view s) {
  while (!s.empty() && isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return std::string(s);
}

std::vector<std::string> SplitList(std::string_view s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string_view::npos) end = s.size();
    std::string item = Trim(s.substr(start, end - start));
    if (!item.empty()) out.push_back(item);
    start = end + 1;
  }
  return out;
}

// Reads the keys of one section, refusing unknown ones.
class SectionReader {
 public:
  SectionReader(std::string_view origin, const std::string& section,
                const std::map<std::string, Entry>& keys)
      : origin_(origin), section_(section), keys_(keys) {}

  std::optional<Entry> Get(const std::string& key) {
    known_.insert(key);
    auto it = keys_.find(key);
    if (it == keys_.end()) return std::nullopt;
    return it->second;
  }
  Status Error(const std::string& key, const std::string& why) const {
    return InvalidArgument(fmt::format("{}: [{}] {}: {}", origin_, section_, key, why));
  }
  Status Missing(const std::string& key, const std::string& hint) const {
    return InvalidArgument(fmt::format("{}: [{}] needs '{}' ({})", origin_, section_, key, hint));
  }
  Status String(const std::string& key, std::string* out) {
    if (auto e = Get(key)) {
      if (e->value.empty()) return Error(key, "is empty");
      *out = e->value;
    }
    return OkStatus();
  }
  Status Duration(const std::string& key, std::chrono::milliseconds* out) {
    if (auto e = Get(key)) {
      auto d = ParseDuration(e->value);
      if (!d.ok()) return Error(key, d.status().message());
      *out = *d;
    }
    return OkStatus();
  }
  Status Size(const std::string& key, uint64_t lo, uint64_t hi, uint64_t* out) {
    if (auto e = Get(key)) {
      auto v = ParseSize(e->value);
      if (!v.ok()) return Error(key, v.status().message());
      if (*v < lo || *v > hi) {
        return Error(key, fmt::format("{} is out of range [{}, {}]", *v, lo, hi));
      }
      *out = *v;
    }
    return OkStatus();
  }
  // Size() into a 32-bit field. REQUIRES: hi < 2^32.
  Status Size32(const std::string& key, uint32_t lo, uint32_t hi, uint32_t* out) {
    uint64_t n = *out;
    RETURN_IF_ERROR(Size(key, lo, hi, &n));
    *out = static_cast<uint32_t>(n);
    return OkStatus();
  }
  Status HostPort(const std::string& key, std::string* host, uint16_t* port) {
    if (auto e = Get(key)) {
      auto hp = ParseHostPort(e->value);
      if (!hp.ok()) return Error(key, hp.status().message());
      *host = hp->first;
      *port = hp->second;
    }
    return OkStatus();
  }
  Status RefuseUnknown() const {
    for (const auto& [k, e] : keys_) {
      if (!known_.count(k)) {
        std::string list;
        for (const auto& kk : known_) list += (list.empty() ? "" : ", ") + kk;
        return InvalidArgument(
            fmt::format("{}: [{}] has unknown key '{}' (known: {})", origin_, section_, k, list));
      }
    }
    return OkStatus();
  }

 private:
  std::string_view origin_;
  const std::string& section_;
  const std::map<std::string, Entry>& keys_;
  std::set<std::string> known_;
};

}  // namespace

StatusOr<std::chrono::milliseconds> ParseDuration(std::string_view text) {
  const std::string t = Trim(text);
  uint64_t n = 0;
  auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), n);
  const std::string unit(p, t.data() + t.size());
  if (ec != std::errc() || (unit.empty() && n != 0)) {
    return InvalidArgument(fmt::format("'{}' is not a duration (use 5s, 500ms, 1m, 2h)", text));
  }
  uint64_t scale = 0;
  if (unit.empty() || unit == "ms") scale = 1;
  if (unit == "s") scale = 1000;
  if (unit == "m") scale = 60'000;
  if (unit == "h") scale = 3'600'000;
  constexpr uint64_t kMaxMs = 365ull * 24 * 3'600'000;  // a year is plenty
  if (scale != 0) {
    if (n > kMaxMs / scale)
      return InvalidArgument(fmt::format("'{}' is too long (max 1 year)", text));
    return std::chrono::milliseconds(n * scale);
  }
  return InvalidArgument(fmt::format("'{}' is not a duration (use 5s, 500ms, 1m, 2h)", text));
}

StatusOr<uint64_t> ParseSize(std::string_view text) {
  const std::string t = Trim(text);
  uint64_t n = 0;
  auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), n);
  std::string unit(p, t.data() + t.size());
  if (ec != std::errc())
    return InvalidArgument(fmt::format("'{}' is not a size (use 4096, 64K, 1M)", text));
  int shift = -1;
  if (unit.empty()) shift = 0;
  if (unit == "K" || unit == "k" || unit == "KiB") shift = 10;
  if (unit == "M" || unit == "MiB") shift = 20;
  if (unit == "G" || unit == "GiB") shift = 30;
  if (shift >= 0) {
    if (n > (UINT64_MAX >> shift)) return InvalidArgument(fmt::format("'{}' is too large", text));
    return n << shift;
  }
  return InvalidArgument(fmt::format("'{}' is not a size (use 4096, 64K, 1M)", text));
}

namespace {

// The INI parser truncates long lines and section names silently; a
// truncated volume id or path must be an error instead.
constexpr size_t kMaxLine = 199;    // inih's INI_MAX_LINE - 1
constexpr size_t kMaxSection = 49;  // inih's INI_MAX_SECTION - 1

Status CheckLengths(std::string_view text, std::string_view origin) {
  int lineno = 0;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    const std::string line = Trim(text.substr(start, end - start));
    ++lineno;
    if (line.size() > kMaxLine) {
      return InvalidArgument(
          fmt::format("{}:{}: line is longer than {} characters", origin, lineno, kMaxLine));
    }
    if (line.starts_with('[') && line.find(']') != std::string::npos &&
        line.find(']') - 1 > kMaxSection) {
      return InvalidArgument(fmt::format(
          "{}:{}: section name is longer than {} characters (volume ids are at most {})", origin,
          lineno, kMaxSection, kMaxSection - 7));
    }
    start = end + 1;
  }
  return OkStatus();
}

}  // namespace

namespace {

// Each Read*Section reads one section into its part of `cfg` (keys not
// given keep their defaults) and fails with the first key that is wrong;
// ReadSection refuses keys that no reader asked for.

Status ReadCairndSection(SectionReader& r, std::string_view origin, DaemonConfig& cfg) {
  RETURN_IF_ERROR(r.String("site", &cfg.site));
  RETURN_IF_ERROR(r.String("control_socket", &cfg.control_socket));
  RETURN_IF_ERROR(r.String("control_group", &cfg.control_group));
  RETURN_IF_ERROR(r.String("admin_group", &cfg.admin_group));
  RETURN_IF_ERROR(r.String("log_level", &cfg.log_level));
  RETURN_IF_ERROR(r.HostPort("metrics_listen", &cfg.metrics_host, &cfg.metrics_port));
  RETURN_IF_ERROR(r.Size("memory_budget", 16u << 20, uint64_t{64} << 30, &cfg.memory_budget));
  // 0: no cap; else at least a 4 MiB record a minute.
  RETURN_IF_ERROR(r.Size("max_send_rate", 0, uint64_t{1} << 40, &cfg.max_send_rate));
  if (cfg.max_send_rate != 0 && cfg.max_send_rate < 64 * 1024) {
    return r.Error("max_send_rate", "is bytes a second: at least 64K (or 0 for no cap)");
  }
  static const std::set<std::string> kLevels = {"trace", "debug", "info", "warn", "error"};
  if (!kLevels.count(cfg.log_level)) {
    return InvalidArgument(
        fmt::format("{}: [cairnd] log_level '{}' is not one of "
                    "trace, debug, info, warn, error",
                    origin, cfg.log_level));
  }
  return OkStatus();
}

Status ReadCephSection(SectionReader& r, DaemonConfig& cfg) {
  RETURN_IF_ERROR(r.String("conf", &cfg.ceph.conf));
  RETURN_IF_ERROR(r.String("client", &cfg.ceph.client));
  if (auto e = r.Get("keyring")) cfg.ceph.keyring = e->value;
  std::chrono::milliseconds op_timeout = cfg.ceph.op_timeout;
  RETURN_IF_ERROR(r.Duration("op_timeout", &op_timeout));
  if (op_timeout < std::chrono::seconds(1) || op_timeout > std::chrono::hours(1) ||
      op_timeout.count() % 1000 != 0) {
    return r.Error("op_timeout", "must be whole seconds from 1s to 1h");
  }
  cfg.ceph.op_timeout = std::chrono::duration_cast<std::chrono::seconds>(op_timeout);
  if (cfg.ceph.client.starts_with("client.")) cfg.ceph.client = cfg.ceph.client.substr(7);
  return OkStatus();
}

Status ReadSinkSection(SectionReader& r, DaemonConfig& cfg) {
  SinkConfig s;
  RETURN_IF_ERROR(r.HostPort("listen", &s.listen_host, &s.listen_port));
  RETURN_IF_ERROR(r.String("spool_dir", &s.spool_dir));
  if (auto e = r.Get("pools")) {
    s.pools = SplitList(e->value);
    if (s.pools.empty()) return r.Error("pools", "lists no pool");
  }
  RETURN_IF_ERROR(r.Size("spool_max_bytes", 0, UINT64_MAX, &s.spool_max_bytes));
  if (s.spool_max_bytes != 0 && s.spool_max_bytes < (1u << 20)) {
    return r.Error("spool_max_bytes", "must be 0 (no limit) or at least 1M");
  }
  RETURN_IF_ERROR(r.Size32("window", 1, 256, &s.window));
  RETURN_IF_ERROR(r.Size("window_bytes", 1u << 20, uint64_t{1} << 30, &s.window_bytes));
  RETURN_IF_ERROR(r.Size32("keep_points", 0, 1000000, &s.keep_points));
  if (auto e = r.Get("retention")) {
    auto tiers = ParseRetentionTiers(e->value);
    if (!tiers.ok()) return r.Error("retention", tiers.status().message());
    s.retention_tiers = std::move(tiers).value();
  }
  cfg.sink = s;
  return OkStatus();
}

// A [source] or [volume] section's snapshot_retention (tiers of the
// source's own snapshots).
Status ReadSnapshotTiers(SectionReader& r, std::vector<RetentionTier>* out) {
  if (auto e = r.Get("snapshot_retention")) {
    auto tiers = ParseRetentionTiers(e->value);
    if (!tiers.ok()) return r.Error("snapshot_retention", tiers.status().message());
    *out = std::move(tiers).value();
  }
  return OkStatus();
}

// A [source] or [volume] section's own retention rules (keep_points,
// retention), if it sets either; keep_points defaults to 24.
Status ReadRetentionRules(SectionReader& r, std::optional<RetentionRules>* out) {
  const bool keep = r.Get("keep_points").has_value();
  const auto tiers = r.Get("retention");
  if (!keep && !tiers) return OkStatus();
  RetentionRules rules;
  RETURN_IF_ERROR(r.Size32("keep_points", 0, 1000000, &rules.keep_last));
  if (tiers) {
    auto parsed = ParseRetentionTiers(tiers->value);
    if (!parsed.ok()) return r.Error("retention", parsed.status().message());
    rules.tiers = std::move(parsed).value();
  }
  *out = std::move(rules);
  return OkStatus();
}

// `compression = none | lz4 | zstd` (codec_link.h), if given.
Status ReadCompression(SectionReader& r, Compression* out) {
  auto e = r.Get("compression");
  if (!e) return OkStatus();
  std::optional<Compression> c = ParseCompression(e->value);
  if (!c) {
    return r.Error("compression", fmt::format("'{}' is not a codec (none, lz4 or zstd)", e->value));
  }
  *out = *c;
  return OkStatus();
}

Status ReadSourceSection(SectionReader& r, DaemonConfig& cfg) {
  DaemonConfig::Source src;
  if (auto e = r.Get("pools")) {
    src.pools = SplitList(e->value);
    if (src.pools.empty()) return r.Error("pools", "lists no pool");
  }
  if (!r.Get("peer")) return r.Missing("peer", "the sink's HOST:PORT");
  RETURN_IF_ERROR(r.HostPort("peer", &src.peer_host, &src.peer_port));
  RETURN_IF_ERROR(r.Duration("interval", &src.interval));
  if (src.interval.count() != 0 && src.interval.count() < 1000) {
    return r.Error("interval", "must be at least 1s (or 0 for on demand only)");
  }
  RETURN_IF_ERROR(r.Size32("keep_snapshots", 0, 100000, &src.keep_snapshots));
  RETURN_IF_ERROR(r.Size32("outage_snapshots", 1, 10000, &src.outage_snapshots));
  RETURN_IF_ERROR(r.String("peer_name", &src.peer_name));
  RETURN_IF_ERROR(ReadRetentionRules(r, &src.retention));
  RETURN_IF_ERROR(ReadSnapshotTiers(r, &src.snapshot_tiers));
  RETURN_IF_ERROR(ReadCompression(r, &src.compression));
  cfg.source = src;
  return OkStatus();
}

// The [volume NAME] section `name`, read into a VolumeConfig.
StatusOr<VolumeConfig> ReadVolume(SectionReader& r, std::string_view origin,
                                  const std::string& name) {
  VolumeConfig v;
  v.id = Trim(std::string_view(name).substr(7));
  if (Status st = ValidateVolumeId(v.id); !st.ok()) {
    return InvalidArgument(fmt::format("{}: [{}]: {}", origin, name, st.message()));
  }
  RETURN_IF_ERROR(r.String("pool", &v.pool));
  RETURN_IF_ERROR(r.String("image", &v.image));
  if (v.image.empty()) return r.Missing("image", "the RBD image to replicate");
  if (!r.Get("peer")) return r.Missing("peer", "the sink's HOST:PORT");
  RETURN_IF_ERROR(r.HostPort("peer", &v.peer_host, &v.peer_port));
  RETURN_IF_ERROR(r.String("peer_name", &v.peer_name));
  RETURN_IF_ERROR(r.String("target_pool", &v.target_pool));
  RETURN_IF_ERROR(r.String("target_image", &v.target_image));
  if (v.target_pool.empty()) v.target_pool = v.pool;
  if (v.target_image.empty()) v.target_image = v.image;
  RETURN_IF_ERROR(r.Duration("interval", &v.interval));
  if (auto e = r.Get("interval"); e && v.interval.count() != 0 && v.interval.count() < 1000) {
    return r.Error("interval", "must be at least 1s (or 0 for on demand only)");
  }
  RETURN_IF_ERROR(r.Size32("keep_snapshots", 0, 100000, &v.keep_snapshots));
  RETURN_IF_ERROR(r.Size32("outage_snapshots", 1, 10000, &v.outage_snapshots));
  RETURN_IF_ERROR(r.Size32("block_size", 4096, 4u << 20, &v.block_size));
  if (v.block_size % 512 != 0) {
    return InvalidArgument(
        fmt::format("{}: [{}] block_size must be a multiple of 512", origin, name));
  }
  RETURN_IF_ERROR(r.Size32("window", 1, 256, &v.window));
  RETURN_IF_ERROR(ReadCompression(r, &v.compression));
  RETURN_IF_ERROR(ReadRetentionRules(r, &v.retention));
  RETURN_IF_ERROR(ReadSnapshotTiers(r, &v.snapshot_tiers));
  RETURN_IF_ERROR(r.String("group", &v.group));
  if (Status st = v.group.empty() ? OkStatus() : ValidateVolumeId(v.group); !st.ok()) {
    return r.Error("group", std::string(st.message()));
  }
  return v;
}

// Fails if volume `v` repeats the id, or the target, of one of `volumes`.
Status CheckVolumeIsNew(const VolumeConfig& v, const std::vector<VolumeConfig>& volumes,
                        std::string_view origin) {
  for (const auto& other : volumes) {
    if (!v.group.empty() && other.group == v.group &&
        (other.pool != v.pool || other.target_pool != v.target_pool ||
         other.peer_host != v.peer_host || other.peer_port != v.peer_port)) {
      return InvalidArgument(fmt::format(
          "{}: volumes '{}' and '{}' are both in group {}, but not in one pool at both sites "
          "to one peer ({} -> {}/{}:{}, {} -> {}/{}:{}): a group's points are recorded in one "
          "catalog",
          origin, other.id, v.id, v.group, other.pool, other.target_pool, other.peer_host,
          other.peer_port, v.pool, v.target_pool, v.peer_host, v.peer_port));
    }
    if (!v.group.empty() && other.group == v.group && other.retention != v.retention) {
      return InvalidArgument(fmt::format(
          "{}: volumes '{}' and '{}' are both in group {} but keep points by other rules: give "
          "every member the same keep_points and retention (a group keeps whole instants)",
          origin, other.id, v.id, v.group));
    }
    if (other.id == v.id) {
      return InvalidArgument(fmt::format("{}: volume '{}' is defined twice", origin, v.id));
    }
    if (other.peer_host == v.peer_host && other.peer_port == v.peer_port &&
        other.target_pool == v.target_pool && other.target_image == v.target_image) {
      return InvalidArgument(fmt::format(
          "{}: volumes '{}' and '{}' both replicate into {}/{} at {}:{}: give one another "
          "target_image",
          origin, other.id, v.id, v.target_pool, v.target_image, v.peer_host, v.peer_port));
    }
  }
  return OkStatus();
}

Status ReadVolumeSection(SectionReader& r, std::string_view origin, const std::string& name,
                         DaemonConfig& cfg) {
  ASSIGN_OR_RETURN(VolumeConfig v, ReadVolume(r, origin, name));
  RETURN_IF_ERROR(CheckVolumeIsNew(v, cfg.volumes, origin));
  cfg.volumes.push_back(v);
  return OkStatus();
}

Status ReadTlsSection(SectionReader& r, DaemonConfig& cfg) {
  RETURN_IF_ERROR(r.String("ca", &cfg.tls.files.ca));
  RETURN_IF_ERROR(r.String("cert", &cfg.tls.files.cert));
  RETURN_IF_ERROR(r.String("key", &cfg.tls.files.key));
  if (auto e = r.Get("insecure")) {
    if (e->value != "true" && e->value != "false") return r.Error("insecure", "is true or false");
    cfg.tls.insecure = e->value == "true";
  }
  return OkStatus();
}

Status ReadPeerSection(SectionReader& r, std::string_view origin, const std::string& name,
                       DaemonConfig& cfg) {
  PeerGrant g;
  // "[peer]" alone names no one (and is shorter than "peer ").
  g.name = name.size() > 5 ? Trim(std::string_view(name).substr(5)) : "";
  if (g.name.empty()) return InvalidArgument(fmt::format("{}: [peer] needs a NAME", origin));
  for (const PeerGrant& other : cfg.peers) {
    if (other.name == g.name) {
      return InvalidArgument(fmt::format("{}: [{}] is defined twice", origin, name));
    }
  }
  RETURN_IF_ERROR(r.String("site", &g.site));
  if (g.site.empty()) return r.Missing("site", "the source site this peer may be");
  if (auto e = r.Get("pools")) {
    g.pools = SplitList(e->value);
    if (g.pools.empty()) return r.Error("pools", "lists no pool");
  }
  if (auto e = r.Get("volumes")) {
    g.volumes = SplitList(e->value);
    if (g.volumes.empty()) return r.Error("volumes", "lists no volume (use * for all)");
  }
  cfg.peers.push_back(g);
  return OkStatus();
}

Status ReadSection(SectionReader& r, std::string_view origin, const std::string& name,
                   DaemonConfig& cfg) {
  if (name == "cairnd") {
    RETURN_IF_ERROR(ReadCairndSection(r, origin, cfg));
  } else if (name == "ceph") {
    RETURN_IF_ERROR(ReadCephSection(r, cfg));
  } else if (name == "sink") {
    RETURN_IF_ERROR(ReadSinkSection(r, cfg));
  } else if (name == "source") {
    RETURN_IF_ERROR(ReadSourceSection(r, cfg));
  } else if (name.starts_with("volume ")) {
    RETURN_IF_ERROR(ReadVolumeSection(r, origin, name, cfg));
  } else if (name == "tls") {
    RETURN_IF_ERROR(ReadTlsSection(r, cfg));
  } else if (name == "peer" || name.starts_with("peer ")) {
    RETURN_IF_ERROR(ReadPeerSection(r, origin, name, cfg));
  } else {
    return InvalidArgument(
        fmt::format("{}: unknown section [{}] (known: cairnd, ceph, sink, source, volume NAME, "
                    "tls, peer NAME)",
                    origin, name));
  }
  return r.RefuseUnknown();
}

}  // namespace

// The links' security as a whole: TLS files unless insecure, and grants
// exactly when a sink checks them.
Status CheckSecurity(const DaemonConfig& cfg, std::string_view origin) {
  const TlsFiles& f = cfg.tls.files;
  const bool any = !f.ca.empty() || !f.cert.empty() || !f.key.empty();
  if (cfg.tls.insecure) {
    if (any) {
      return InvalidArgument(fmt::format(
          "{}: [tls] insecure = true, yet ca, cert or key is set: say which one is meant", origin));
    }
    if (!cfg.peers.empty()) {
      return InvalidArgument(fmt::format(
          "{}: [peer {}] cannot be checked over plaintext links ([tls] insecure = true)", origin,
          cfg.peers.front().name));
    }
    return OkStatus();
  }
  if (f.ca.empty() || f.cert.empty() || f.key.empty()) {
    return InvalidArgument(fmt::format(
        "{}: [tls] needs ca, cert and key: links between sites are mutual TLS (deploy/cairn-certs "
        "makes them); insecure = true allows plaintext, which anyone on the network can read and "
        "forge",
        origin));
  }
  if (!cfg.sink && !cfg.peers.empty()) {
    return InvalidArgument(fmt::format(
        "{}: [peer {}] grants what a source may write to this node's sink, but there is no [sink]",
        origin, cfg.peers.front().name));
  }
  if (cfg.sink && cfg.peers.empty()) {
    return InvalidArgument(fmt::format(
        "{}: [sink] needs a [peer NAME] section for each source that may replicate here (NAME: a "
        "name its certificate carries)",
        origin));
  }
  for (const PeerGrant& g : cfg.peers) {
    for (const std::string& pool : g.pools) {
      if (std::find(cfg.sink->pools.begin(), cfg.sink->pools.end(), pool) ==
          cfg.sink->pools.end()) {
        return InvalidArgument(fmt::format("{}: [peer {}] pools: '{}' is not one of [sink] pools",
                                           origin, g.name, pool));
      }
    }
  }
  return OkStatus();
}

StatusOr<DaemonConfig> ParseConfig(std::string_view text, std::string_view origin) {
  RETURN_IF_ERROR(CheckLengths(text, origin));
  Parsed parsed;
  const std::string copy(text);
  const int rc = ini_parse_string(copy.c_str(), &Handler, &parsed);
  if (!parsed.error.empty()) return InvalidArgument(fmt::format("{}:{}", origin, parsed.error));
  if (rc > 0)
    return InvalidArgument(
        fmt::format("{}:{}: not INI syntax (expected [section] or key = value)", origin, rc));
  if (rc < 0) return Internal(fmt::format("{}: INI parser failed ({})", origin, rc));

  DaemonConfig cfg;
  for (const std::string& name : parsed.order) {
    SectionReader r(origin, name, parsed.sections[name]);
    RETURN_IF_ERROR(ReadSection(r, origin, name, cfg));
  }
  if (!cfg.sink && !cfg.source && cfg.volumes.empty()) {
    return InvalidArgument(fmt::format(
        "{}: nothing to do: add a [sink] section, a [source] or [volume NAME] section, or both",
        origin));
  }
  RETURN_IF_ERROR(CheckSecurity(cfg, origin));
  return cfg;
}

StatusOr<DaemonConfig> LoadConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFound(fmt::format("cannot read config file {}", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseConfig(ss.str(), path);
}

}  // namespace cairn
