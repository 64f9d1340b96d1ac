// RenderMetrics (metrics.h). Names follow Prometheus's conventions: base
// units (seconds, bytes), _total for counters, one family per name with
// its HELP and TYPE lines before its samples.
#include "engine/daemon/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <functional>
#include <string_view>

namespace cairn {
namespace {

// A label value, escaped as the format wants (\\, \", \n).
std::string Escape(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

class Writer {
 public:
  explicit Writer(const std::string& site) : site_(Escape(site)) {}

  void Family(std::string_view name, std::string_view type, std::string_view help) {
    out_ += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
  }
  // A sample of volume `v` (labels site, volume, role, and `extra`).
  void Sample(std::string_view name, const VolumeStatusInfo& v, double value,
              std::string_view extra = "") {
    out_ += fmt::format("{}{{site=\"{}\",volume=\"{}\",role=\"{}\"{}}} {}\n", name, site_,
                        Escape(v.volume), Escape(v.role), extra, value);
  }
  void GroupSample(std::string_view name, const GroupStatusInfo& g, double value) {
    out_ += fmt::format("{}{{site=\"{}\",group=\"{}\"}} {}\n", name, site_, Escape(g.group), value);
  }
  void SiteSample(std::string_view name, double value) {
    out_ += fmt::format("{}{{site=\"{}\"}} {}\n", name, site_, value);
  }
  std::string Take() { return std::move(out_); }

 private:
  const std::string site_;
  std::string out_;
};

struct PerVolume {
  std::string_view name;
  std::string_view type;
  std::string_view help;
  std::function<double(const VolumeStatusInfo&)> value;
  // Which volumes have a sample (all if empty).
  std::function<bool(const VolumeStatusInfo&)> present = nullptr;
};

bool HasPoint(const VolumeStatusInfo& v) { return v.last_seq > 0; }
// A verify ended and said what it found.
bool HasVerdict(const VolumeStatusInfo& v) {
  return v.verify.id != 0 && !v.verify.running && v.verify.error.empty();
}

// The families with one sample per volume (some only once it has a point).
std::vector<PerVolume> PerVolumeFamilies(const MetricsInput& in) {
  return {
      {"cairn_volume_has_point", "gauge",
       "1 if the volume has a restore point (source: acknowledged).",
       [](const auto& v) { return v.last_seq > 0 ? 1.0 : 0.0; }},
      {"cairn_volume_last_point_seq", "gauge", "Number of the newest restore point.",
       [](const auto& v) { return double(v.last_seq); }},
      {"cairn_volume_lag_seconds", "gauge",
       "Now minus the last moment the newest restore point was known to hold the image.",
       [](const auto& v) { return v.lag_seconds; }, HasPoint},
      {"cairn_volume_point_age_seconds", "gauge",
       "Now minus when the source snapshot of the newest restore point was taken.",
       [&](const auto& v) {
         return v.last_point_time_ns > 0 ? (in.now_ns - v.last_point_time_ns) / 1e9 : 0.0;
       },
       HasPoint},
      {"cairn_volume_up", "gauge",
       "1 unless the volume's replication is disconnected or failing (state error).",
       [](const auto& v) {
         return v.state == VolumeState::kDisconnected || v.state == VolumeState::kError ? 0.0 : 1.0;
       }},
      {"cairn_volume_bytes_total", "counter",
       "Data bytes of the epochs made (source: sent; sink: received and applied).",
       [](const auto& v) { return double(v.bytes_total); }},
      {"cairn_volume_epochs_total", "counter", "Epochs made restore points.",
       [](const auto& v) { return double(v.epochs_total); }},
      {"cairn_volume_errors_total", "counter", "Failed attempts (connect, epoch, apply).",
       [](const auto& v) { return double(v.errors_total); }},
      {"cairn_volume_corrupt_frames_total", "counter",
       "Frames refused because they failed verification (sink).",
       [](const auto& v) { return double(v.corrupt_frames_total); }},
      {"cairn_volume_resumed_epochs_total", "counter",
       "Epochs finished from a durable prefix after a cut.",
       [](const auto& v) { return double(v.resumed_epochs_total); }},
      {"cairn_volume_unchanged_checks_total", "counter",
       "Due epochs skipped because the image had not changed since the newest point.",
       [](const auto& v) { return double(v.unchanged_checks_total); }},
      {"cairn_volume_pending_snapshots", "gauge",
       "Source snapshots not yet restore points (source).",
       [](const auto& v) { return double(v.pending_snapshots); }},
      {"cairn_volume_wire_bytes_total", "counter",
       "Payload bytes of data records put on the link, compressed ones as compressed (source).",
       [](const auto& v) { return double(v.wire_bytes_total); }},
      {"cairn_volume_epoch_sent_bytes", "gauge",
       "Data bytes of the epoch in progress sent so far (source).",
       [](const auto& v) { return double(v.epoch_sent_bytes); }},
      {"cairn_volume_throughput_bytes_per_second", "gauge", "Throughput of the last epoch.",
       [](const auto& v) { return v.throughput_bps; }},
      {"cairn_volume_verify_mismatched_grains", "gauge",
       "Grains of the point the last cairn verify compared that differ from its source "
       "(source; 0: equal).",
       [](const auto& v) { return double(v.verify.mismatched_grains); }, HasVerdict},
      {"cairn_volume_verify_seq", "gauge", "The restore point the last cairn verify compared.",
       [](const auto& v) { return double(v.verify.seq); }, HasVerdict},
  };
}

// The histogram of epoch durations: cumulative buckets, sum and count.
void EpochHistograms(const MetricsInput& in, Writer& w) {
  w.Family("cairn_volume_epoch_duration_seconds", "histogram",
           "How long epochs took (source: send to applied; sink: begin to point).");
  for (const VolumeStatusInfo& v : in.volumes) {
    uint64_t cumulative = 0;
    const auto& le = VolumeStatusInfo::kEpochSecondsBuckets;
    for (size_t i = 0; i < v.epoch_seconds_count.size(); ++i) {
      cumulative += v.epoch_seconds_count[i];
      const std::string bound = i < le.size() ? fmt::format("{}", le[i]) : "+Inf";
      w.Sample("cairn_volume_epoch_duration_seconds_bucket", v, double(cumulative),
               fmt::format(",le=\"{}\"", bound));
    }
    w.Sample("cairn_volume_epoch_duration_seconds_sum", v, v.epoch_seconds_sum);
    w.Sample("cairn_volume_epoch_duration_seconds_count", v, double(cumulative));
  }
}

// The source's consistency groups.
void GroupFamilies(const MetricsInput& in, Writer& w) {
  w.Family("cairn_group_point_seq", "gauge",
           "The newest instant of the group every member has made a point of.");
  for (const auto& g : in.groups) w.GroupSample("cairn_group_point_seq", g, double(g.last_seq));
  w.Family("cairn_group_point_age_seconds", "gauge",
           "Now minus when the group's newest whole instant was taken (taken by this process).");
  for (const auto& g : in.groups) {
    if (g.last_time_ns > 0) {
      w.GroupSample("cairn_group_point_age_seconds", g, (in.now_ns - g.last_time_ns) / 1e9);
    }
  }
  w.Family("cairn_group_lag_seconds", "gauge",
           "Now minus the last moment the group's newest whole instant was known to hold every "
           "member (taken, or found unchanged since).");
  for (const auto& g : in.groups) {
    if (g.last_time_ns > 0) {
      w.GroupSample("cairn_group_lag_seconds", g,
                    (in.now_ns - std::max(g.last_time_ns, g.unchanged_at_ns)) / 1e9);
    }
  }
  w.Family("cairn_group_waiting_members", "gauge",
           "Members without their point of the group's newest instant (the next waits).");
  for (const auto& g : in.groups) {
    w.GroupSample("cairn_group_waiting_members", g, double(g.waiting_for.size()));
  }
  w.Family("cairn_group_up", "gauge", "0 while the group's last instant could not be taken.");
  for (const auto& g : in.groups) w.GroupSample("cairn_group_up", g, g.error.empty() ? 1 : 0);
}

}  // namespace

std::string RenderMetrics(const MetricsInput& in) {
  Writer w(in.site);
  w.Family("cairn_up", "gauge", "1 while cairnd serves.");
  w.SiteSample("cairn_up", 1);
  const std::vector<PerVolume> families = PerVolumeFamilies(in);
  for (const PerVolume& f : families) {
    w.Family(f.name, f.type, f.help);
    for (const VolumeStatusInfo& v : in.volumes) {
      if (!f.present || f.present(v)) w.Sample(f.name, v, f.value(v));
    }
  }
  w.Family("cairn_volume_state", "gauge", "1 for the volume's state, 0 for the others.");
  for (const VolumeStatusInfo& v : in.volumes) {
    for (VolumeState s : {VolumeState::kIdle, VolumeState::kSyncing, VolumeState::kReceiving,
                          VolumeState::kApplying, VolumeState::kDisconnected, VolumeState::kError,
                          VolumeState::kStandby}) {
      w.Sample("cairn_volume_state", v, v.state == s ? 1 : 0,
               fmt::format(",state=\"{}\"", StateName(s)));
    }
  }
  EpochHistograms(in, w);
  GroupFamilies(in, w);
  w.Family("cairn_spool_bytes", "gauge",
           "Bytes of the sink's spool files of the volume (received, not yet a point or kept "
           "for a resume).");
  for (const auto& [volume, bytes] : in.spool_bytes) {
    VolumeStatusInfo v;
    v.volume = volume;
    v.role = "sink";
    w.Sample("cairn_spool_bytes", v, double(bytes));
  }
  return w.Take();
}

}  // namespace cairn
