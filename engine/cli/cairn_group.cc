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
int WaitForGroupPoint(const Cli& cli, const Group& g, uint64_t want) {
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
}

std::optional<int> RunGroup(const Cli& cli, const Group& g) {
  if (!g.status ||
      !(g.status->parsed() || g.points->parsed() || g.replicate->parsed() || g.restore->parsed() ||
        g.drill_start->parsed() || g.drill_stop->parsed() || g.failover->parsed())) {
    return std::nullopt;
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
