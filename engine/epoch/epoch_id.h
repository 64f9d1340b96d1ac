// What names an epoch and what it is a copy of: the one declaration shared
// by the plan that makes it (EpochPlan), the EpochBegin frame that announces
// it, the summary of what was sent or verified (EpochSummary) and the
// restore point it becomes (catalog's RestorePoint).
#pragma once

#include <cstdint>
#include <string>

namespace cairn {

struct EpochId {
  std::string volume;
  uint64_t seq = 0;
  uint64_t base_seq = 0;     // the restore point it builds on; 0: a full epoch
  uint64_t image_size = 0;   // of the source snapshot
  int64_t snap_time_ns = 0;  // unix ns: when the source snapshot was taken
  std::string source_site;   // the site whose cairnd sent it
  // A consistency group's instant (snapshot `seq` of `group_members`
  // volumes at once), or "" for a volume on its own.
  std::string group;
  uint32_t group_members = 0;
  friend bool operator==(const EpochId&, const EpochId&) = default;
};

}  // namespace cairn
