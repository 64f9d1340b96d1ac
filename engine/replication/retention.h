// Retention tiers: which restore points a sink keeps. The newest
// `keep_last` always; then, per tier, the newest point of each of the last
// `count` periods that hold one (10-minute periods for an hour, hours for a
// day, days for a year...), by the time the point's source snapshot was
// taken, in UTC. A point any rule keeps is kept; points held by drills or
// verifies are kept besides (the caller's). As restic's and borg's
// `forget --keep-*`, which operators know.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/status.h"
#include "engine/catalog/catalog.h"

namespace cairn {

struct RetentionTier {
  int64_t period_ns = 0;  // fixed periods from the Unix epoch (weeks from a Monday)
  bool months = false;    // calendar months instead (period_ns unused)
  uint32_t count = 0;
  friend bool operator==(const RetentionTier&, const RetentionTier&) = default;
};

// A volume's own rules (its source's `keep_points` and `retention`), which
// its Hello carries to the sink; a volume without them follows the sink's.
// A consistency group's members share theirs.
struct RetentionRules {
  uint32_t keep_last = 24;  // 0: all (with no tiers)
  std::vector<RetentionTier> tiers;
  friend bool operator==(const RetentionRules&, const RetentionRules&) = default;
};

// "10m*6 1h*24 1d*365 1w*52 1mo*12": PERIOD*COUNT, separated by spaces or
// commas; periods in m, h, d, w (whole multiples) or mo (calendar months).
// kInvalidArgument, saying what is wrong, on anything else.
StatusOr<std::vector<RetentionTier>> ParseRetentionTiers(std::string_view spec);

// The spec of `tiers`, as ParseRetentionTiers reads it back (each period in
// the largest unit it is a whole multiple of): "10m*6 1h*24".
std::string FormatRetentionTiers(const std::vector<RetentionTier>& tiers);

// "24 newest and 1h*24 1d*30", for logs and status.
std::string DescribeRetention(const RetentionRules& rules);

// The seqs of `points` to keep: the newest `keep_last` and those the tiers
// keep. `points` in any order.
std::set<uint64_t> PointsToKeep(const std::vector<RestorePoint>& points, uint32_t keep_last,
                                const std::vector<RetentionTier>& tiers);

// True if `rules` keep every point (0 newest, no tiers).
inline bool KeepsAll(const RetentionRules& rules) {
  return rules.keep_last == 0 && rules.tiers.empty();
}

// As above, by `rules`; every point if they keep all.
std::set<uint64_t> PointsToKeep(const std::vector<RestorePoint>& points,
                                const RetentionRules& rules);

}  // namespace cairn
