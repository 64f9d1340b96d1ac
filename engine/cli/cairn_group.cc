// cairn group: consistency groups. status and replicate on the source's
// cairnd (the instants it takes), points and restore on the standby's.

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <thread>

#include "engine/cli/cli.h"

namespace cairn::cli {
namespace {

nlohmann::json GroupStatusJson(const pb::GroupStatus& g) {
  return {{"group", g.group()},
          {"pool", g.pool()},
          {"volumes", g.volumes()},
          {"instant_seq", g.instant_seq()},
          {"instant_time", Time(g.instant_time_ns())},
          {"last_seq", g.last_seq()},
          {"unchanged_as_of", g.unchanged_at_ns() ? Time(g.unchanged_at_ns()) : ""},
          {"instants_total", g.instants_total()},
          {"waiting_for", g.waiting_for()},
          {"error", g.error()}};
}

int PrintStatus(const Cli& cli, const pb::GroupReply& r) {
  if (cli.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& g : r.status()) out.push_back(GroupStatusJson(g));
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  for (const auto& g : r.status()) {
    std::string waiting;
    for (const auto& v : g.waiting_for()) waiting += (waiting.empty() ? "" : ", ") + v;
    std::printf(
        "%s: %d volumes (RBD group %s/%s); instant %lu taken %s; newest group point %lu%s%s\n",
        g.group().c_str(), g.volumes_size(), g.pool().c_str(), g.group().c_str(),
        static_cast<unsigned long>(g.instant_seq()), Time(g.instant_time_ns()).c_str(),
        static_cast<unsigned long>(g.last_seq()),
        waiting.empty() ? "" : ("; waiting for " + waiting).c_str(),
        g.error().empty() ? "" : ("; ERROR: " + g.error()).c_str());
  }
  return 0;
}

int PrintPoints(const Cli& cli, const pb::GroupReply& r) {
  if (cli.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& p : r.points()) {
      out.push_back({{"group", p.group()},
                     {"seq", p.seq()},
                     {"source_time", Time(p.source_time_ns())},
                     {"volumes", p.volumes()}});
    }
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf("%-8s %-22s %s\n", "POINT", "SOURCE TIME", "VOLUMES");
  for (const auto& p : r.points()) {
    std::string volumes;
    for (const auto& v : p.volumes()) volumes += (volumes.empty() ? "" : " ") + v;
    std::printf("%-8lu %-22s %s\n", static_cast<unsigned long>(p.seq()),
                Time(p.source_time_ns()).c_str(), volumes.c_str());
  }
  return 0;
}

// Waits until every member holds group point `want` or a later one.
int WaitForGroupPoint(const Cli& cli, const Group& g, uint64_t want, bool announce = true) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(g.timeout);
  pb::ControlRequest req;
  req.mutable_group()->set_group(g.group);
  req.mutable_group()->set_action(pb::GroupRequest::STATUS);
  std::string last_error;
  uint64_t have = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    auto r = cli.Call(req);
    if (!r.ok()) return cli.Fail(r.status());
    if (r->group().status_size() > 0) {
      have = r->group().status(0).last_seq();
      last_error = r->group().status(0).error();
    }
    if (have >= want) {
      if (!announce) return 0;
      std::printf(cli.json ? "{\"group\": \"%s\", \"seq\": %lu}\n"
                           : "%s: group point %lu made (every member applied it)\n",
                  g.group.c_str(), static_cast<unsigned long>(have));
      return 0;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // a poll, not a sync
  }
  return cli.Fail(Unavailable(
      fmt::format("group point {} of {} was not made within {} s (newest: {}; last error: {})",
                  want, g.group, g.timeout, have, last_error.empty() ? "none" : last_error)));
}

// --back VOLUME=POOL/IMAGE, one per member.
StatusOr<pb::RegisterVolumesRequest> BackTargets(const Group& g) {
  pb::RegisterVolumesRequest out;
  for (const auto& b : g.back) {
    const auto eq = b.find('=');
    const auto slash = b.find('/', eq == std::string::npos ? 0 : eq);
    if (eq == std::string::npos || eq == 0 || slash == std::string::npos || slash == eq + 1 ||
        slash + 1 == b.size()) {
      return InvalidArgument(
          fmt::format("--back {}: expected VOLUME=POOL/IMAGE (the member's image at home)", b));
    }
    auto* v = out.add_volumes();
    v->set_volume(b.substr(0, eq));
    v->set_target_pool(b.substr(eq + 1, slash - eq - 1));
    v->set_target_image(b.substr(slash + 1));
  }
  return out;
}

// After the promotion: the promoted members replicate back as one group.
int ReplicateBack(const Cli& cli, const Group& g, const pb::GroupReply& promoted,
                  const pb::RegisterVolumesRequest& back) {
  for (const auto& image : promoted.images()) {
    std::fprintf(cli.json ? stderr : stdout, "%s: group point %lu FAILED OVER: promoted into %s\n",
                 g.group.c_str(), static_cast<unsigned long>(promoted.seq()), image.c_str());
  }
  if (back.volumes_size() != promoted.images_size()) {
    std::fprintf(stderr,
                 "%s: %d members were promoted but --back names %d: only those named replicate "
                 "back in the group\n",
                 g.group.c_str(), promoted.images_size(), back.volumes_size());
  }
  pb::ControlRequest req;
  req.mutable_group()->set_group(g.group);
  req.mutable_group()->set_action(pb::GroupRequest::REPLICATE_BACK);
  *req.mutable_group()->mutable_back() = back;
  auto reply = cli.Call(req);
  if (!reply.ok()) {
    return cli.Fail(reply.status().Annotate(
        "promoted, but not replicating back (fix what it says, then run the same failover "
        "again: the promotions are kept)"));
  }
  nlohmann::json to = nlohmann::json::object();
  for (const auto& v : back.volumes()) {
    to[v.volume()] = v.target_pool() + "/" + v.target_image();
    if (!cli.json) {
      std::printf("%s: %s replicates back into %s/%s, one instant for the group\n", g.group.c_str(),
                  v.volume().c_str(), v.target_pool().c_str(), v.target_image().c_str());
    }
  }
  if (cli.json) {
    std::printf("%s\n", nlohmann::json({{"group", g.group},
                                        {"seq", promoted.seq()},
                                        {"images", promoted.images()},
                                        {"back_to", to}})
                            .dump(2)
                            .c_str());
  }
  return 0;
}

// cairn group failback: a final group point home, then the hand-back.
int Failback(const Cli& cli, const Group& g) {
  pb::ControlRequest req;
  req.mutable_group()->set_group(g.group);
  req.mutable_group()->set_action(pb::GroupRequest::REPLICATE);
  auto asked = cli.Call(req);
  if (!asked.ok()) return cli.Fail(asked.status());
  const uint64_t want = asked->group().seq();
  if (const int waited = WaitForGroupPoint(cli, g, want, false); waited != 0) return waited;
  req.mutable_group()->set_action(pb::GroupRequest::FAILBACK);
  req.mutable_group()->set_seq(want);
  auto done = cli.Call(req);
  if (!done.ok()) return cli.Fail(done.status());
  const auto& r = done->group();
  if (cli.json) {
    std::printf("%s\n", nlohmann::json({{"group", g.group},
                                        {"seq", r.seq()},
                                        {"primary_site", r.primary_site()},
                                        {"kept_as", r.images()}})
                            .dump(2)
                            .c_str());
    return 0;
  }
  std::printf("%s: FAILED BACK to site %s at group point %lu, every member with nothing lost\n",
              g.group.c_str(), r.primary_site().c_str(), static_cast<unsigned long>(r.seq()));
  for (const auto& image : r.images()) std::printf("  kept here as %s\n", image.c_str());
  return 0;
}

}  // namespace

void DefineGroup(CLI::App& app, Group& g) {
  CLI::App* group = app.add_subcommand(
      "group", "consistency groups: volumes whose restore points are taken at one instant");
  group->require_subcommand(1);
  g.status =
      group->add_subcommand("status", "the groups this source replicates, and their instants");
  g.status->add_option("group", g.group, "one group (default: all)");
  g.points = group->add_subcommand("points", "the group points at this standby");
  g.points->add_option("group", g.group, "the group")->required();
  g.replicate = group->add_subcommand("replicate", "take an instant of every member now");
  g.replicate->add_option("group", g.group, "the group")->required();
  g.replicate->add_flag("--wait", g.wait, "wait until every member has its point of it");
  g.replicate->add_option("--timeout", g.timeout, "seconds to wait (with --wait)");
  g.restore = group->add_subcommand(
      "restore", "restore every member at one group point, all or nothing (on the standby)");
  g.restore->add_option("group", g.group, "the group")->required();
  g.restore->add_option("point", g.point, "the group point's seq, or 'latest' (default)");
  g.restore->add_option("--suffix", g.suffix,
                        "member M goes to <M's standby image>-SUFFIX (default: restore-<seq>)");
  g.restore->add_flag("--full", g.full, "copy all data (default: instant clones)");
  g.restore->add_flag("--force", g.force, "even a point a verify found differs");
  CLI::App* drill = group->add_subcommand(
      "drill", "a drill of every member at one group point, while replication goes on");
  drill->require_subcommand(1);
  g.drill_start = drill->add_subcommand("start", "clone every member's point, held until stop");
  g.drill_start->add_option("group", g.group, "the group")->required();
  g.drill_start->add_option("point", g.point, "the group point's seq, or 'latest' (default)");
  g.drill_stop = drill->add_subcommand("stop", "remove the group's drill clones, lift the holds");
  g.drill_stop->add_option("group", g.group, "the group")->required();
  g.failover = group->add_subcommand(
      "failover",
      "fence every member and promote it at one group point into <standby image>-SUFFIX, all "
      "or nothing (on the standby)");
  g.failover->add_option("group", g.group, "the group")->required();
  g.failover->add_option("point", g.point, "the group point's seq, or 'latest' (default)");
  g.failover->add_option("--suffix", g.suffix, "the promoted images' suffix (default: failover)");
  g.failover->add_option("--back", g.back,
                         "VOLUME=POOL/IMAGE, one per member: replicate the promoted images back "
                         "as one group, each into its image at home (default: promote only)");
  g.failback = group->add_subcommand(
      "failback",
      "a final group point of every member home, then all handed back at it (on the standby the "
      "group failed over to, each member detached)");
  g.failback->add_option("group", g.group, "the group")->required();
  g.failback->add_option("--timeout", g.timeout, "seconds to wait for the final group point");
}

std::optional<int> RunGroup(const Cli& cli, const Group& g) {
  if (!g.status || !(g.status->parsed() || g.points->parsed() || g.replicate->parsed() ||
                     g.restore->parsed() || g.drill_start->parsed() || g.drill_stop->parsed() ||
                     g.failover->parsed() || g.failback->parsed())) {
    return std::nullopt;
  }
  if (g.failback->parsed()) return Failback(cli, g);
  std::optional<pb::RegisterVolumesRequest> back;
  if (g.failover->parsed() && !g.back.empty()) {
    auto parsed = BackTargets(g);
    if (!parsed.ok()) return cli.Fail(parsed.status());
    back = std::move(parsed).value();
  }
  pb::ControlRequest req;
  auto* q = req.mutable_group();
  q->set_group(g.group);
  if (g.status->parsed()) q->set_action(pb::GroupRequest::STATUS);
  if (g.points->parsed()) q->set_action(pb::GroupRequest::POINTS);
  if (g.replicate->parsed()) q->set_action(pb::GroupRequest::REPLICATE);
  if (g.drill_stop->parsed()) q->set_action(pb::GroupRequest::DRILL_STOP);
  if (g.drill_start->parsed() || g.failover->parsed()) {
    q->set_action(g.failover->parsed() ? pb::GroupRequest::PROMOTE : pb::GroupRequest::DRILL_START);
    const auto seq = ParsePoint(g.point, g.group);
    if (!seq.ok()) return cli.Fail(seq.status());
    q->set_seq(*seq);
    q->set_suffix(g.suffix);
  }
  if (g.restore->parsed()) {
    q->set_action(pb::GroupRequest::RESTORE);
    const auto seq = ParsePoint(g.point, g.group);
    if (!seq.ok()) return cli.Fail(seq.status());
    q->set_seq(*seq);
    q->set_suffix(g.suffix);
    q->set_full(g.full);
    q->set_force(g.force);
  }
  auto reply = cli.Call(req);
  if (!reply.ok()) return cli.Fail(reply.status());
  const auto& r = reply->group();
  if (back) return ReplicateBack(cli, g, r, *back);
  if (g.status->parsed()) return PrintStatus(cli, r);
  if (g.points->parsed()) return PrintPoints(cli, r);
  if (g.replicate->parsed()) {
    if (!g.wait) {
      std::printf(cli.json ? "{\"group\": \"%s\", \"seq\": %lu}\n"
                           : "%s: instant asked for; group point %lu will hold every write "
                             "made before\n",
                  g.group.c_str(), static_cast<unsigned long>(r.seq()));
      return 0;
    }
    return WaitForGroupPoint(cli, g, r.seq());
  }
  if (cli.json) {
    std::printf("%s\n",
                nlohmann::json({{"group", g.group}, {"seq", r.seq()}, {"images", r.images()}})
                    .dump(2)
                    .c_str());
    return 0;
  }
  const char* done = g.restore->parsed()       ? "restored to"
                     : g.drill_start->parsed() ? "drill is"
                     : g.drill_stop->parsed()  ? "drill stopped, removed"
                                               : "FAILED OVER: promoted into";
  for (const auto& image : r.images()) {
    std::printf("%s: group point %lu %s %s\n", g.group.c_str(), static_cast<unsigned long>(r.seq()),
                done, image.c_str());
  }
  return 0;
}

}  // namespace cairn::cli
