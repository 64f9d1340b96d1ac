// Prometheus metrics of one cairnd, in the text exposition format
// (version 0.0.4): what `cairn status` shows, per volume and role, as
// gauges, counters and a histogram of epoch durations. RenderMetrics is a
// pure function of the status; MetricsServer (metrics_http.h) serves it.
//
// Thread-safety: pure function.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/replication/replication.h"

namespace cairn {

struct MetricsInput {
  std::string site;
  std::vector<VolumeStatusInfo> volumes;
  std::vector<GroupStatusInfo> groups;  // source: the consistency groups
  // sink: bytes of spool files per volume (epochs received, not yet
  // points or kept for a resume)
  std::map<std::string, uint64_t> spool_bytes;
  int64_t now_ns = 0;  // for the age of newest points
};

std::string RenderMetrics(const MetricsInput& in);

}  // namespace cairn
