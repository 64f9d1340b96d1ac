#include "engine/catalog/catalog.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <charconv>
#include <cstring>
#include <ctime>
#include <set>

#include "engine/catalog/catalog_internal.h"
#include "proto/cairn.pb.h"

namespace cairn {
namespace {

constexpr uint8_t kCatalogVersion = 1;

std::string PointKey(std::string_view volume, uint64_t seq) {
  return fmt::format("point/{}/{:020}", volume, seq);
}
std::string PointPrefix(std::string_view volume) { return fmt::format("point/{}/", volume); }
std::string VerifiedKey(std::string_view volume, uint64_t seq) {
  return fmt::format("verified/{}/{:020}", volume, seq);
}
std::string VerifiedPrefix(std::string_view volume) { return fmt::format("verified/{}/", volume); }
std::string HoldPrefix(std::string_view volume) { return fmt::format("hold/{}/", volume); }
std::string HoldKey(std::string_view volume, uint64_t seq, std::string_view image) {
  return fmt::format("hold/{}/{:020}/{}", volume, seq, image);
}

}  // namespace

namespace catalog_internal {

// A record's stored form: the version byte, the body, and the XXH3-64 of
// both.
std::string Seal(const google::protobuf::MessageLite& m) {
  std::string out(1, static_cast<char>(kCatalogVersion));
  m.AppendToString(&out);
  const uint64_t h = XXH3_64bits(out.data(), out.size());
  out.append(reinterpret_cast<const char*>(&h), sizeof h);
  return out;
}

// Parses a sealed record into `m`; kDataLoss (naming `key`) if truncated,
// damaged or unparsable.
Status Unseal(std::string_view bytes, std::string_view key, google::protobuf::MessageLite* m) {
  if (bytes.size() < 1 + sizeof(uint64_t)) {
    return DataLoss(fmt::format("catalog record {} is truncated ({} bytes)", key, bytes.size()));
  }
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + bytes.size() - sizeof stored, sizeof stored);
  const std::string_view covered = bytes.substr(0, bytes.size() - sizeof stored);
  if (XXH3_64bits(covered.data(), covered.size()) != stored) {
    return DataLoss(fmt::format("catalog record {} checksum mismatch", key));
  }
  if (static_cast<uint8_t>(covered[0]) != kCatalogVersion) {
    return FailedPrecondition(fmt::format("catalog record {} has version {}, this build reads {}",
                                          key, static_cast<uint8_t>(covered[0]), kCatalogVersion));
  }
  if (!m->ParseFromArray(covered.data() + 1, static_cast<int>(covered.size() - 1))) {
    return DataLoss(fmt::format("catalog record {} does not parse", key));
  }
  return OkStatus();
}

}  // namespace catalog_internal

namespace {

using catalog_internal::Seal;
using catalog_internal::Unseal;

StatusOr<PointVerification> DecodeVerification(std::string_view bytes, std::string_view key) {
  pb::VerifyEnd m;
  RETURN_IF_ERROR(Unseal(bytes, key, &m));
  return PointVerification{.recorded_ns = m.recorded_ns(),
                           .compared_bytes = m.compared_bytes(),
                           .mismatched_grains = m.mismatched_grains(),
                           .grain = m.grain()};
}

constexpr char kSinkInstanceKey[] = "instance/sink";
constexpr uint8_t kSinkInstanceVersion = 1;

// One "name=value\n" line; a newline in the value would end it early.
void AppendField(std::string& out, std::string_view name, std::string_view value) {
  out.append(name);
  out.push_back('=');
  for (char c : value) out.push_back(c == '\n' || c == '\r' ? ' ' : c);
  out.push_back('\n');
}

bool ParseInt(std::string_view v, int64_t* out) {
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), *out);
  return ec == std::errc() && end == v.data() + v.size();
}

}  // namespace

void RestorePointToProto(const RestorePoint& p, pb::RestorePoint* m) {
  m->set_volume(p.epoch.volume);
  m->set_seq(p.epoch.seq);
  m->set_base_seq(p.epoch.base_seq);
  m->set_source_time_ns(p.epoch.snap_time_ns);
  m->set_created_time_ns(p.created_time_ns);
  m->set_pool(p.pool);
  m->set_image(p.image);
  m->set_snap(p.snap);
  m->set_image_size(p.epoch.image_size);
  m->set_data_bytes(p.data_bytes);
  m->set_zero_bytes(p.zero_bytes);
  m->set_epoch_digest(p.epoch_digest.AsBytes());
  m->set_chain_digest(p.chain_digest.AsBytes());
  m->set_state(pb::RestorePoint::COMPLETE);
  m->set_source_site(p.epoch.source_site);
  m->set_group(p.epoch.group);
  m->set_group_members(p.epoch.group_members);
  for (const std::string& image : p.held_by) m->add_held_by(image);
  if (p.verification) {
    m->set_verified_ns(p.verification->recorded_ns);
    m->set_verify_mismatched_grains(p.verification->mismatched_grains);
    m->set_verify_grain(p.verification->grain);
  }
}

std::string EncodeRestorePoint(const RestorePoint& p) {
  pb::RestorePoint m;
  RestorePoint bare = p;
  bare.verification.reset();  // records of their own
  bare.held_by.clear();
  RestorePointToProto(bare, &m);
  return Seal(m);
}

StatusOr<RestorePoint> RestorePointFromProto(const pb::RestorePoint& m, std::string_view what) {
  RestorePoint p;
  p.epoch = EpochId{.volume = m.volume(),
                    .seq = m.seq(),
                    .base_seq = m.base_seq(),
                    .image_size = m.image_size(),
                    .snap_time_ns = m.source_time_ns(),
                    .source_site = m.source_site(),
                    .group = m.group(),
                    .group_members = m.group_members()};
  p.created_time_ns = m.created_time_ns();
  p.pool = m.pool();
  p.image = m.image();
  p.snap = m.snap();
  p.data_bytes = m.data_bytes();
  p.zero_bytes = m.zero_bytes();
  p.held_by.assign(m.held_by().begin(), m.held_by().end());
  if (m.verified_ns() != 0) {
    p.verification = PointVerification{.recorded_ns = m.verified_ns(),
                                       .mismatched_grains = m.verify_mismatched_grains(),
                                       .grain = m.verify_grain()};
  }
  if (!EpochDigest::FromString(m.epoch_digest(), &p.epoch_digest) ||
      !ChainDigest::FromString(m.chain_digest(), &p.chain_digest)) {
    return DataLoss(fmt::format("{} has a malformed digest", what));
  }
  return p;
}

StatusOr<RestorePoint> DecodeRestorePoint(std::string_view bytes, std::string_view key) {
  pb::RestorePoint m;
  RETURN_IF_ERROR(Unseal(bytes, key, &m));
  return RestorePointFromProto(m, fmt::format("catalog record {}", key));
}

std::string EncodeSinkInstance(const SinkInstance& si) {
  std::string out(1, static_cast<char>(kSinkInstanceVersion));
  AppendField(out, "addr", si.addr);
  AppendField(out, "site", si.site);
  AppendField(out, "host", si.host);
  AppendField(out, "pid", std::to_string(si.pid));
  AppendField(out, "boot_id", si.boot_id);
  AppendField(out, "started_ns", std::to_string(si.started_ns));
  const uint64_t h = XXH3_64bits(out.data(), out.size());
  out.append(reinterpret_cast<const char*>(&h), sizeof h);
  return out;
}

StatusOr<SinkInstance> DecodeSinkInstance(std::string_view bytes, std::string_view key) {
  if (bytes.size() < 1 + sizeof(uint64_t)) {
    return DataLoss(fmt::format("catalog record {} is truncated ({} bytes)", key, bytes.size()));
  }
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + bytes.size() - sizeof stored, sizeof stored);
  std::string_view covered = bytes.substr(0, bytes.size() - sizeof stored);
  if (XXH3_64bits(covered.data(), covered.size()) != stored) {
    return DataLoss(fmt::format("catalog record {} checksum mismatch", key));
  }
  if (static_cast<uint8_t>(covered[0]) != kSinkInstanceVersion) {
    return FailedPrecondition(fmt::format("catalog record {} has version {}, this build reads {}",
                                          key, static_cast<uint8_t>(covered[0]),
                                          kSinkInstanceVersion));
  }
  covered.remove_prefix(1);
  SinkInstance si;
  while (!covered.empty()) {
    const size_t nl = covered.find('\n');
    const std::string_view line = covered.substr(0, nl);
    covered.remove_prefix(nl == std::string_view::npos ? covered.size() : nl + 1);
    const size_t eq = line.find('=');
    if (eq == std::string_view::npos) {
      return DataLoss(fmt::format("catalog record {} has a line without '='", key));
    }
    const std::string_view name = line.substr(0, eq);
    const std::string_view value = line.substr(eq + 1);
    bool ok = true;
    if (name == "addr") {
      si.addr = value;
    } else if (name == "site") {
      si.site = value;
    } else if (name == "host") {
      si.host = value;
    } else if (name == "boot_id") {
      si.boot_id = value;
    } else if (name == "pid") {
      ok = ParseInt(value, &si.pid);
    } else if (name == "started_ns") {
      ok = ParseInt(value, &si.started_ns);
    }
    if (!ok) return DataLoss(fmt::format("catalog record {}: {} is not a number", key, name));
  }
  if (si.addr.empty()) return DataLoss(fmt::format("catalog record {} names no address", key));
  return si;
}

std::string DescribeSinkInstance(const SinkInstance& si) {
  const time_t t = static_cast<time_t>(si.started_ns / 1'000'000'000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (si.pid == 0 && si.host.empty() && si.started_ns == 0) {
    return fmt::format("{} (no instance record describes it)", si.addr);
  }
  return fmt::format("{} (cairnd pid {} on host {}, site {}, started {})", si.addr, si.pid,
                     si.host.empty() ? "?" : si.host, si.site.empty() ? "?" : si.site, when);
}

Status ValidateVolumeId(std::string_view v) {
  if (v.empty() || v.size() > 128) {
    return InvalidArgument(fmt::format("volume id '{}' must be 1 to 128 characters", v));
  }
  if (v.front() == '.')
    return InvalidArgument(fmt::format("volume id '{}' must not start with '.'", v));
  for (char c : v) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) {
      return InvalidArgument(
          fmt::format("volume id '{}' has '{}': use only letters, digits, '.', '_' and '-'", v, c));
    }
  }
  return OkStatus();
}

std::string SnapName(uint64_t seq) { return fmt::format("cairn.{}", seq); }

std::optional<uint64_t> ParseSnapName(std::string_view snap) {
  constexpr std::string_view kPrefix = "cairn.";
  if (!snap.starts_with(kPrefix)) return std::nullopt;
  snap.remove_prefix(kPrefix.size());
  uint64_t seq = 0;
  auto [end, ec] = std::from_chars(snap.data(), snap.data() + snap.size(), seq);
  if (ec != std::errc() || end != snap.data() + snap.size() || seq == 0) return std::nullopt;
  return seq;
}

Status Catalog::AddPoint(const RestorePoint& p) {
  RETURN_IF_ERROR(ValidateVolumeId(p.epoch.volume));
  if (p.epoch.group.empty()) {
    return kv_.Commit({{PointKey(p.epoch.volume, p.epoch.seq), EncodeRestorePoint(p)}}, {});
  }
  RETURN_IF_ERROR(ValidateVolumeId(p.epoch.group).Annotate("group name"));
  return kv_.Commit({{PointKey(p.epoch.volume, p.epoch.seq), EncodeRestorePoint(p)},
                     {catalog_internal::GroupMemberKey(p.epoch.group, p.epoch.seq, p.epoch.volume),
                      EncodeRestorePoint(p)}},
                    {});
}

Status Catalog::RemovePoint(std::string_view volume, uint64_t seq) {
  const std::string key = PointKey(volume, seq);
  std::vector<std::string> remove = {key, VerifiedKey(volume, seq)};
  // A group member's point takes its group point with it: the group can no
  // longer be restored at that instant.
  if (auto v = kv_.Get(key); v.ok()) {
    if (auto p = DecodeRestorePoint(*v, key); p.ok() && !p->epoch.group.empty()) {
      remove.push_back(catalog_internal::GroupMemberKey(p->epoch.group, seq, volume));
    }
  }
  return kv_.Commit({}, remove);
}

Status Catalog::AddHold(std::string_view volume, uint64_t seq, std::string_view image) {
  RETURN_IF_ERROR(Get(volume, seq).status());
  return kv_.Commit({{HoldKey(volume, seq, image), std::string(image)}}, {});
}

Status Catalog::RemoveHold(std::string_view volume, uint64_t seq, std::string_view image) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  return kv_.Commit({}, {HoldKey(volume, seq, image)});
}

StatusOr<std::vector<std::pair<uint64_t, std::string>>> Catalog::Holds(std::string_view volume) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  const std::string prefix = HoldPrefix(volume);
  ASSIGN_OR_RETURN(const auto kvs, kv_.Scan(prefix));
  std::vector<std::pair<uint64_t, std::string>> out;
  for (const auto& [k, image] : kvs) {
    // hold/<volume>/<seq as 20 digits>/<image>
    const std::string_view seq = std::string_view(k).substr(prefix.size(), 20);
    uint64_t n = 0;
    auto [end, ec] = std::from_chars(seq.data(), seq.data() + seq.size(), n);
    if (ec != std::errc() || end != seq.data() + seq.size()) {
      return DataLoss(fmt::format("catalog record {} names no restore point", k));
    }
    out.emplace_back(n, image);
  }
  return out;
}

Status Catalog::SetVerification(std::string_view volume, uint64_t seq, const PointVerification& v) {
  RETURN_IF_ERROR(Get(volume, seq).status());
  pb::VerifyEnd m;
  m.set_seq(seq);
  m.set_compared_bytes(v.compared_bytes);
  m.set_mismatched_grains(v.mismatched_grains);
  m.set_grain(v.grain);
  m.set_recorded_ns(v.recorded_ns);
  return kv_.Commit({{VerifiedKey(volume, seq), Seal(m)}}, {});
}

Status Catalog::HandBack(std::string_view volume, std::string_view pool, std::string_view image) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  ASSIGN_OR_RETURN(auto kvs, kv_.Scan(PointPrefix(volume)));
  std::vector<std::string> gone;
  gone.reserve(kvs.size() + 2);
  for (const auto& [k, v] : kvs) gone.push_back(k);
  ASSIGN_OR_RETURN(auto verified, kv_.Scan(VerifiedPrefix(volume)));
  for (const auto& [k, v] : verified) gone.push_back(k);
  gone.push_back(fmt::format("owner/{}/{}", pool, image));
  gone.push_back(fmt::format("resolved/{}", volume));
  return kv_.Commit({}, gone);
}

StatusOr<std::vector<RestorePoint>> Catalog::Points(std::string_view volume) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  ASSIGN_OR_RETURN(auto kvs, kv_.Scan(PointPrefix(volume)));
  ASSIGN_OR_RETURN(const auto verified, kv_.Scan(VerifiedPrefix(volume)));
  ASSIGN_OR_RETURN(const auto holds, Holds(volume));
  std::vector<RestorePoint> out;
  out.reserve(kvs.size());
  for (const auto& [k, v] : kvs) {
    ASSIGN_OR_RETURN(RestorePoint p, DecodeRestorePoint(v, k));
    const std::string vkey = VerifiedKey(volume, p.epoch.seq);
    if (auto it = verified.find(vkey); it != verified.end()) {
      ASSIGN_OR_RETURN(p.verification, DecodeVerification(it->second, vkey));
    }
    for (const auto& [seq, image] : holds) {
      if (seq == p.epoch.seq) p.held_by.push_back(image);
    }
    out.push_back(std::move(p));
  }
  return out;
}

StatusOr<std::optional<RestorePoint>> Catalog::Latest(std::string_view volume) {
  ASSIGN_OR_RETURN(auto points, Points(volume));
  if (points.empty()) return std::optional<RestorePoint>();
  return std::optional<RestorePoint>(std::move(points.back()));
}

StatusOr<RestorePoint> Catalog::Get(std::string_view volume, uint64_t seq) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  const std::string key = PointKey(volume, seq);
  auto v = kv_.Get(key);
  if (!v.ok()) {
    if (v.status().code() == Code::kNotFound) {
      return NotFound(fmt::format("volume {} has no restore point {}", volume, seq));
    }
    return v.status();
  }
  ASSIGN_OR_RETURN(RestorePoint p, DecodeRestorePoint(*v, key));
  ASSIGN_OR_RETURN(const auto holds, Holds(volume));
  for (const auto& [held, image] : holds) {
    if (held == seq) p.held_by.push_back(image);
  }
  const std::string vkey = VerifiedKey(volume, seq);
  auto verified = kv_.Get(vkey);
  if (verified.ok()) {
    ASSIGN_OR_RETURN(p.verification, DecodeVerification(*verified, vkey));
  } else if (verified.status().code() != Code::kNotFound) {
    return verified.status();
  }
  return p;
}

StatusOr<std::vector<std::string>> Catalog::Volumes() {
  ASSIGN_OR_RETURN(auto kvs, kv_.Scan("point/"));
  std::vector<std::string> out;
  for (const auto& [k, v] : kvs) {
    std::string_view rest = std::string_view(k).substr(6);
    std::string_view vol = rest.substr(0, rest.find('/'));
    if (out.empty() || out.back() != vol) out.emplace_back(vol);
  }
  return out;
}

Status Catalog::SetImageOwner(std::string_view pool, std::string_view image,
                              std::string_view volume) {
  return kv_.Commit({{fmt::format("owner/{}/{}", pool, image), std::string(volume)}}, {});
}

StatusOr<std::string> Catalog::ImageOwner(std::string_view pool, std::string_view image) {
  auto v = kv_.Get(fmt::format("owner/{}/{}", pool, image));
  if (!v.ok() && v.status().code() == Code::kNotFound) return std::string();
  return v;
}

// promoted/<volume> -> "<seq> <pool>/<image>"
StatusOr<std::optional<Catalog::Promotion>> Catalog::GetPromotion(std::string_view volume) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  const std::string key = fmt::format("promoted/{}", volume);
  auto v = kv_.Get(key);
  if (!v.ok()) {
    if (v.status().code() == Code::kNotFound) return std::optional<Promotion>();
    return v.status();
  }
  Promotion p;
  const auto space = v->find(' ');
  const auto slash = v->find('/', space == std::string::npos ? 0 : space);
  auto [end, ec] =
      std::from_chars(v->data(), v->data() + (space == std::string::npos ? 0 : space), p.seq);
  if (space == std::string::npos || slash == std::string::npos || ec != std::errc() ||
      end != v->data() + space) {
    return DataLoss(fmt::format("catalog key {} holds '{}', not '<seq> <pool>/<image>'", key, *v));
  }
  p.pool = v->substr(space + 1, slash - space - 1);
  p.image = v->substr(slash + 1);
  return std::optional<Promotion>(p);
}

Status Catalog::SetPromotion(std::string_view volume, const Promotion& p) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  return kv_.Commit(
      {{fmt::format("promoted/{}", volume), fmt::format("{} {}/{}", p.seq, p.pool, p.image)}}, {});
}

Status Catalog::ClearPromotion(std::string_view volume) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  return kv_.Commit({}, {fmt::format("promoted/{}", volume), fmt::format("resolved/{}", volume)});
}

// resolved/<volume> -> site name
StatusOr<std::string> Catalog::Resolution(std::string_view volume) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  auto v = kv_.Get(fmt::format("resolved/{}", volume));
  if (!v.ok() && v.status().code() == Code::kNotFound) return std::string();
  return v;
}

Status Catalog::SetResolution(std::string_view volume, std::string_view site) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  return kv_.Commit({{fmt::format("resolved/{}", volume), std::string(site)}}, {});
}

StatusOr<std::optional<Catalog::SinkRecord>> Catalog::SinkInstanceRecord() {
  auto v = kv_.Get(kSinkInstanceKey);
  if (!v.ok()) {
    if (v.status().code() == Code::kNotFound) return std::optional<SinkRecord>();
    return v.status();
  }
  if (v->empty()) return std::optional<SinkRecord>();  // what CommitIf takes as absent
  ASSIGN_OR_RETURN(SinkInstance si, DecodeSinkInstance(*v, kSinkInstanceKey));
  return std::optional<SinkRecord>(SinkRecord{std::move(si), std::move(v).value()});
}

Status Catalog::ReplaceSinkInstance(const std::optional<std::string>& expected_raw,
                                    const SinkInstance& self) {
  return kv_.CommitIf(kSinkInstanceKey, expected_raw,
                      {{kSinkInstanceKey, EncodeSinkInstance(self)}}, {});
}

namespace {

// The instance record of `kv` (nullopt: none) and its raw bytes for
// CommitIf; an unreadable record is described in `warning`.
struct RecordRead {
  std::optional<SinkInstance> instance;
  std::optional<std::string> raw;
};
StatusOr<RecordRead> ReadSinkRecord(KvStore& kv, const std::string& pool, std::string* warning) {
  RecordRead r;
  auto v = kv.Get(kSinkInstanceKey);
  if (!v.ok() && v.status().code() != Code::kNotFound) {
    return v.status().Annotate(fmt::format("pool {}: reading the sink instance record", pool));
  }
  if (!v.ok() || v->empty()) return r;
  auto si = DecodeSinkInstance(*v, kSinkInstanceKey);
  if (si.ok()) {
    r.instance = std::move(si).value();
  } else {
    *warning = fmt::format(
        "pool {}: the sink instance record is unreadable ({}); replaced (it only describes the "
        "sink, the sink lock says whom to fence)",
        pool, si.status().ToString());
  }
  r.raw = std::move(v).value();
  return r;
}

}  // namespace

StatusOr<SinkRegistration> FenceAndRegisterSink(const std::vector<SinkCatalog>& catalogs,
                                                const SinkInstance& self, const FenceFn& fence) {
  if (self.addr.empty()) return InvalidArgument("registering a sink instance without an address");
  // Another sink taking the lock between our look and our take makes us
  // look again; a handful of rounds means sinks are restarting in a loop.
  constexpr int kRounds = 5;
  SinkRegistration out;
  std::set<std::string> fenced_addrs;
  for (const SinkCatalog& c : catalogs) {
    if (c.lock->self_addr() != self.addr) {
      return InvalidArgument(fmt::format("pool {}: the sink lock is taken as {}, not as {}", c.pool,
                                         c.lock->self_addr(), self.addr));
    }
    bool registered = false;
    for (int round = 0; round < kRounds && !registered; ++round) {
      std::string warning;
      ASSIGN_OR_RETURN(RecordRead rec, ReadSinkRecord(*c.kv, c.pool, &warning));
      auto holders = c.lock->Holders();
      if (!holders.ok()) {
        return holders.status().Annotate(
            fmt::format("pool {}: reading who holds the sink lock", c.pool));
      }
      bool recorded_holds = false;
      for (const SinkLockHolder& h : *holders) {
        if (rec.instance && rec.instance->addr == h.addr) recorded_holds = true;
        if (h.addr == self.addr) continue;
        SinkInstance prev;
        prev.addr = h.addr;
        if (rec.instance && rec.instance->addr == h.addr) prev = *rec.instance;
        if (!fenced_addrs.count(h.addr)) {
          if (Status st = fence(prev); !st.ok()) {
            return st.Annotate(fmt::format("pool {}: fencing the previous sink {}", c.pool,
                                           DescribeSinkInstance(prev)));
          }
          fenced_addrs.insert(h.addr);
          out.fenced.push_back({prev, {}});
        }
        for (auto& f : out.fenced) {
          if (f.instance.addr == h.addr && (f.pools.empty() || f.pools.back() != c.pool)) {
            f.pools.push_back(c.pool);
          }
        }
        if (Status st = c.lock->Break(h); !st.ok()) {
          return st.Annotate(fmt::format("pool {}: fenced {}", c.pool, h.addr));
        }
      }
      if (rec.instance && !recorded_holds && rec.instance->addr != self.addr) {
        warning = fmt::format(
            "pool {}: the sink instance record names {}, which holds no sink lock: not fenced "
            "(a sink that stops cleanly gives its lock up; a record is never acted on by itself)",
            c.pool, DescribeSinkInstance(*rec.instance));
      }
      if (Status st = c.lock->Take(); !st.ok()) {
        if (st.code() == Code::kAborted) continue;
        return st.Annotate(fmt::format("pool {}: taking the sink lock", c.pool));
      }
      Status st = Catalog(*c.kv).ReplaceSinkInstance(rec.raw, self);
      if (st.ok()) {
        registered = true;
        if (!warning.empty()) out.warnings.push_back(std::move(warning));
      } else if (st.code() != Code::kAborted) {
        return st.Annotate(fmt::format("pool {}: recording this sink instance", c.pool));
      }
    }
    if (!registered) {
      return Unavailable(fmt::format(
          "pool {}: the sink lock changed hands {} times while this sink started: is another "
          "sink cairnd for pool {} restarting in a loop?",
          c.pool, kRounds, c.pool));
    }
  }
  return out;
}

}  // namespace cairn
