#include "engine/replication/retention.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <ctime>
#include <string>
#include <utility>

namespace cairn {
namespace {

constexpr int64_t kMinuteNs = 60'000'000'000;
// 1970-01-01 was a Thursday: weeks count from Monday 1969-12-29.
constexpr int64_t kWeekOffsetNs = 3 * 24 * 60 * kMinuteNs;

StatusOr<RetentionTier> ParseTier(std::string_view t) {
  const auto star = t.find('*');
  const auto bad = [&](std::string_view why) {
    return InvalidArgument(fmt::format(
        "retention tier '{}' {}: write PERIOD*COUNT, e.g. 10m*6 1h*24 1d*365 1w*52 1mo*12", t,
        why));
  };
  if (star == std::string_view::npos) return bad("has no '*'");
  const std::string_view period = t.substr(0, star), count = t.substr(star + 1);
  RetentionTier tier;
  auto [cend, cec] = std::from_chars(count.data(), count.data() + count.size(), tier.count);
  if (cec != std::errc() || cend != count.data() + count.size() || tier.count == 0) {
    return bad("has no count of at least 1");
  }
  uint64_t n = 0;
  auto [pend, pec] = std::from_chars(period.data(), period.data() + period.size(), n);
  const std::string_view unit(pend, period.data() + period.size() - pend);
  if (pec != std::errc() || n == 0 || n > 10000) return bad("has no period from 1 to 10000");
  if (unit == "mo") {
    if (n != 1) return bad("counts months one at a time (1mo)");
    tier.months = true;
    return tier;
  }
  const int64_t scale = unit == "m"   ? kMinuteNs
                        : unit == "h" ? 60 * kMinuteNs
                        : unit == "d" ? 24 * 60 * kMinuteNs
                        : unit == "w" ? 7 * 24 * 60 * kMinuteNs
                                      : 0;
  if (scale == 0) return bad("has a period unit other than m, h, d, w or mo");
  tier.period_ns = static_cast<int64_t>(n) * scale;
  return tier;
}

// The period of `tier` that the time `ns` falls in.
int64_t PeriodOf(const RetentionTier& tier, int64_t ns) {
  if (tier.months) {
    const std::time_t t = ns / 1'000'000'000;
    std::tm tm{};
    gmtime_r(&t, &tm);
    return int64_t{tm.tm_year} * 12 + tm.tm_mon;
  }
  const int64_t shifted = tier.period_ns % (7 * 24 * 60 * kMinuteNs) == 0 ? ns + kWeekOffsetNs : ns;
  return shifted >= 0 ? shifted / tier.period_ns : (shifted - tier.period_ns + 1) / tier.period_ns;
}

}  // namespace

StatusOr<std::vector<RetentionTier>> ParseRetentionTiers(std::string_view spec) {
  std::vector<RetentionTier> out;
  size_t i = 0;
  while (i < spec.size()) {
    while (i < spec.size() && (spec[i] == ' ' || spec[i] == ',' || spec[i] == '\t')) ++i;
    size_t j = i;
    while (j < spec.size() && spec[j] != ' ' && spec[j] != ',' && spec[j] != '\t') ++j;
    if (j > i) {
      ASSIGN_OR_RETURN(RetentionTier t, ParseTier(spec.substr(i, j - i)));
      out.push_back(t);
    }
    i = j;
  }
  return out;
}

std::set<uint64_t> PointsToKeep(const std::vector<RestorePoint>& points,
                                const RetentionRules& rules) {
  if (KeepsAll(rules)) {
    std::set<uint64_t> all;
    for (const auto& p : points) all.insert(p.epoch.seq);
    return all;
  }
  return PointsToKeep(points, rules.keep_last, rules.tiers);
}

std::string FormatRetentionTiers(const std::vector<RetentionTier>& tiers) {
  std::string out;
  for (const RetentionTier& t : tiers) {
    if (!out.empty()) out += ' ';
    if (t.months) {
      out += fmt::format("1mo*{}", t.count);
      continue;
    }
    int64_t n = t.period_ns / kMinuteNs;
    const char* unit = "m";
    for (const auto& [scale, name] :
         {std::pair<int64_t, const char*>{7 * 24 * 60, "w"}, {24 * 60, "d"}, {60, "h"}}) {
      if (n % scale == 0) {
        n /= scale;
        unit = name;
        break;
      }
    }
    out += fmt::format("{}{}*{}", n, unit, t.count);
  }
  return out;
}

std::string DescribeRetention(const RetentionRules& rules) {
  if (KeepsAll(rules)) return "every point";
  std::string out = fmt::format("the {} newest", rules.keep_last);
  if (!rules.tiers.empty()) out += " and " + FormatRetentionTiers(rules.tiers);
  return out;
}

std::set<uint64_t> PointsToKeep(const std::vector<RestorePoint>& points, uint32_t keep_last,
                                const std::vector<RetentionTier>& tiers) {
  std::vector<const RestorePoint*> newest_first;
  for (const auto& p : points) newest_first.push_back(&p);
  std::sort(
      newest_first.begin(), newest_first.end(),
      [](const RestorePoint* a, const RestorePoint* b) { return a->epoch.seq > b->epoch.seq; });
  std::set<uint64_t> keep;
  for (size_t i = 0; i < newest_first.size() && i < keep_last; ++i) {
    keep.insert(newest_first[i]->epoch.seq);
  }
  for (const RetentionTier& tier : tiers) {
    uint32_t periods = 0;
    std::optional<int64_t> last;
    for (const RestorePoint* p : newest_first) {
      const int64_t period = PeriodOf(tier, p->epoch.snap_time_ns);
      if (last && *last == period) continue;  // an older point of a period already kept
      last = period;
      keep.insert(p->epoch.seq);
      if (++periods == tier.count) break;
    }
  }
  return keep;
}

}  // namespace cairn
