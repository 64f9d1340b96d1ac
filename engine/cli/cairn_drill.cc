// cairn drill start|stop: a restore point cloned for a test while the
// volume replicates on, and held against retention until the drill stops.

#include <CLI/CLI.hpp>
#include <cstdio>

#include "engine/cli/cli.h"

namespace cairn::cli {

void DefineDrill(CLI::App& app, Drill& d) {
  CLI::App* drill = app.add_subcommand(
      "drill",
      "non-disruptive drill: clone a restore point while replication goes on (on the standby's "
      "cairnd)");
  drill->require_subcommand(1);
  d.start = drill->add_subcommand("start", "clone a restore point and hold it against retention");
  d.start->add_option("volume", d.volume, "the volume")->required();
  d.start->add_option("point", d.point, "the restore point's seq, or 'latest' (default)");
  d.start->add_option("--to", d.image, "the clone's name (default: <standby image>-drill-<seq>)");
  d.stop = drill->add_subcommand("stop", "remove a drill's clone and lift its hold");
  d.stop->add_option("volume", d.volume, "the volume")->required();
  d.stop->add_option("--image", d.image, "one drill's clone (default: every drill of the volume)");
}

std::optional<int> RunDrill(const Cli& cli, const Drill& d) {
  if (!d.start || !d.stop || (!d.start->parsed() && !d.stop->parsed())) return std::nullopt;
  const bool stop = d.stop->parsed();
  pb::ControlRequest req;
  auto* q = req.mutable_drill();
  q->set_volume(d.volume);
  q->set_image(d.image);
  q->set_stop(stop);
  if (!stop) {
    const auto seq = ParsePoint(d.point, d.volume);
    if (!seq.ok()) return cli.Fail(seq.status());
    q->set_seq(*seq);
  }
  auto reply = cli.Call(req);
  if (!reply.ok()) return cli.Fail(reply.status());
  const auto& r = reply->drill();
  if (cli.json) {
    std::printf("%s\n", nlohmann::json({{"volume", d.volume},
                                        {"stopped", stop},
                                        {"pool", r.pool()},
                                        {"images", r.images()},
                                        {"seq", r.seq()},
                                        {"source_time", Time(r.source_time_ns())}})
                            .dump(2)
                            .c_str());
  } else if (stop) {
    for (const auto& image : r.images()) {
      std::printf("%s: drill %s stopped (removed; its point is no longer held)\n", d.volume.c_str(),
                  image.c_str());
    }
  } else {
    std::printf(
        "%s: drill of restore point %lu (%s) is %s/%s; replication goes on, the point "
        "is held until `cairn drill stop %s`\n",
        d.volume.c_str(), static_cast<unsigned long>(r.seq()), Time(r.source_time_ns()).c_str(),
        r.pool().c_str(), r.images(0).c_str(), d.volume.c_str());
  }
  return 0;
}

}  // namespace cairn::cli
