#include "engine/daemon/registry.h"

#include <fmt/format.h>

#include <charconv>
#include <utility>
#include <vector>

namespace cairn {
namespace {

// Tiers as the registry holds them; a bad spec is DataLoss.
StatusOr<std::vector<RetentionTier>> DecodeTiers(const std::string& v) {
  auto tiers = ParseRetentionTiers(v);
  if (!tiers.ok()) return DataLoss(tiers.status().message());
  return tiers;
}

Status DecodeRetention(const std::string& k, const std::string& v, RetentionRules* out) {
  if (k == "retention") {
    ASSIGN_OR_RETURN(out->tiers, DecodeTiers(v));
    return OkStatus();
  }
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out->keep_last);
  if (ec != std::errc() || end != v.data() + v.size()) {
    return DataLoss(fmt::format("keep_points '{}' is not a count", v));
  }
  return OkStatus();
}

}  // namespace

// registry omap: volume/<id> -> "pool=P\nimage=I\ntarget_pool=TP\ntarget_image=TI\n"
// and "group=G\n" for a member of a consistency group, "keep_points=N\n"
// and "retention=TIERS\n" for its own retention rules,
// "snapshot_retention=TIERS\n" for its own snapshot tiers at the source.
std::string EncodeRegistration(const Registration& r) {
  std::string out = fmt::format("pool={}\nimage={}\ntarget_pool={}\ntarget_image={}\n{}", r.pool,
                                r.image, r.target_pool, r.target_image,
                                r.group.empty() ? "" : fmt::format("group={}\n", r.group));
  if (r.retention) {
    out += fmt::format("keep_points={}\nretention={}\n", r.retention->keep_last,
                       FormatRetentionTiers(r.retention->tiers));
  }
  if (!r.snapshot_tiers.empty()) {
    out += fmt::format("snapshot_retention={}\n", FormatRetentionTiers(r.snapshot_tiers));
  }
  return out;
}

StatusOr<Registration> DecodeRegistration(const std::string& key, const std::string& text) {
  Registration r;
  r.volume = key.substr(key.find('/') + 1);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    const size_t eq = line.find('=');
    if (eq == std::string::npos) {
      return DataLoss(fmt::format("{} {}: malformed line '{}'", kRegistryObject, key, line));
    }
    const std::string k = line.substr(0, eq), v = line.substr(eq + 1);
    if (k == "pool")
      r.pool = v;
    else if (k == "image")
      r.image = v;
    else if (k == "target_pool")
      r.target_pool = v;
    else if (k == "target_image")
      r.target_image = v;
    else if (k == "group")
      r.group = v;
    else if (k == "snapshot_retention") {
      auto tiers = DecodeTiers(v);
      if (!tiers.ok()) return tiers.status().Annotate(fmt::format("{} {}", kRegistryObject, key));
      r.snapshot_tiers = std::move(tiers).value();
    } else if (k == "keep_points" || k == "retention") {
      if (!r.retention) r.retention = RetentionRules{};
      RETURN_IF_ERROR(DecodeRetention(k, v, &*r.retention)
                          .Annotate(fmt::format("{} {}", kRegistryObject, key)));
    }
  }
  if (r.pool.empty() || r.image.empty()) {
    return DataLoss(fmt::format("{} {}: no pool or image in '{}'", kRegistryObject, key, text));
  }
  return r;
}

bool SameRegistration(const Registration& a, const Registration& b) {
  return a.pool == b.pool && a.image == b.image && a.target_pool == b.target_pool &&
         a.target_image == b.target_image;
}

}  // namespace cairn
