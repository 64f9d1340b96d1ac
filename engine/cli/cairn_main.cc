// cairn: the command-line tool. Talks to cairnd over its control socket.
//
//   cairn [--socket PATH] [--json] status [VOLUME]
//   cairn points VOLUME
//   cairn restore VOLUME POINT --to NEW_IMAGE [--full] [--force]
//   cairn replicate VOLUME [--wait] [--timeout SECONDS]
//   cairn promote VOLUME [POINT] --to IMAGE
//   cairn release VOLUME
//   cairn resolve VOLUME --keep SITE
//   cairn failover VOLUME [POINT] --to IMAGE [--back-to IMAGE] [--no-back]
//   cairn failback VOLUME [--timeout SECONDS]
//   cairn verify VOLUME [POINT] [--repair] [--timeout SECONDS]
//   cairn drill start VOLUME [POINT] [--to IMAGE] / drill stop VOLUME [--image IMAGE]
//   cairn group status [GROUP] / points GROUP / replicate GROUP [--wait]
//   cairn group restore GROUP [POINT] [--suffix S] [--full] [--force]
//   cairn group drill start GROUP [POINT] / drill stop GROUP
//   cairn group failover GROUP [POINT] [--suffix S]
//
// Exit codes: engine/cli/cli.h.
#include <fmt/format.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "engine/base/clock.h"
#include "engine/cli/cli.h"
#include "proto/cairn.pb.h"

namespace {

using cairn::Code;
using cairn::cli::Bytes;
using cairn::cli::Cli;
using cairn::cli::ParsePoint;
using cairn::cli::Time;
using cairn::cli::VerifyJson;
using nlohmann::json;

json PointJson(const cairn::pb::RestorePoint& p) {
  return {{"volume", p.volume()},
          {"seq", p.seq()},
          {"base_seq", p.base_seq()},
          {"source_time", Time(p.source_time_ns())},
          {"source_time_ns", p.source_time_ns()},
          {"created_time_ns", p.created_time_ns()},
          {"pool", p.pool()},
          {"image", p.image()},
          {"snap", p.snap()},
          {"image_size", p.image_size()},
          {"data_bytes", p.data_bytes()},
          {"zero_bytes", p.zero_bytes()},
          {"source_site", p.source_site()},
          {"verified", p.verified_ns() ? json(Time(p.verified_ns())) : json(nullptr)},
          {"verified_ns", p.verified_ns()},
          {"verify_mismatched_grains", p.verify_mismatched_grains()},
          {"held_by", p.held_by()}};
}

// "-" never verified, "equal <time>", or "DIFFERS (N grains) <time>"; and
// the drills that hold it.
std::string Verified(const cairn::pb::RestorePoint& p) {
  std::string out = "-";
  if (p.verified_ns() != 0 && p.verify_mismatched_grains() == 0) {
    out = "equal " + Time(p.verified_ns());
  } else if (p.verified_ns() != 0) {
    out =
        fmt::format("DIFFERS ({} grains) {}", p.verify_mismatched_grains(), Time(p.verified_ns()));
  }
  for (const auto& image : p.held_by()) out += ", held by drill " + image;
  return out;
}

json StatusJson(const cairn::pb::VolumeStatus& v) {
  return {{"volume", v.volume()},
          {"role", v.role()},
          {"state", v.state()},
          {"pool", v.pool()},
          {"image", v.image()},
          {"peer", v.peer()},
          {"last_seq", v.last_seq()},
          {"last_point_time", Time(v.last_point_time_ns())},
          {"last_point_time_ns", v.last_point_time_ns()},
          {"lag_seconds", v.lag_seconds()},
          {"throughput_bps", v.throughput_bps()},
          {"bytes_total", v.bytes_total()},
          {"epochs_total", v.epochs_total()},
          {"errors_total", v.errors_total()},
          {"corrupt_frames_total", v.corrupt_frames_total()},
          {"resumed_epochs_total", v.resumed_epochs_total()},
          {"pending_snapshots", v.pending_snapshots()},
          {"unchanged_checks_total", v.unchanged_checks_total()},
          {"epoch_sent_bytes", v.epoch_sent_bytes()},
          {"wire_bytes_total", v.wire_bytes_total()},
          {"error", v.error()},
          {"verify", VerifyJson(v.verify())}};
}

// The options of every subcommand (CLI11 writes them as it parses).
struct Args {
  std::string volume;
  std::string point;                     // restore: seq or "latest"
  std::string promote_point = "latest";  // promote: seq or "latest"
  std::string to;                        // restore, promote: the new image
  std::string keep;                      // resolve: the site whose writes win
  bool full = false;                     // restore
  bool force = false;                    // restore: a point a verify found differs
  bool repair = false;                   // verify
  std::string back_to;                   // failover: the image at the other site
  bool no_back = false;                  // failover: no replication back
  bool wait = false;                     // replicate
  double timeout = 300;                  // replicate --wait, failback: seconds
};

// The subcommands, to tell which one was given.
struct Commands {
  CLI::App* status;
  CLI::App* points;
  CLI::App* restore;
  CLI::App* replicate;
  CLI::App* promote;
  CLI::App* release;
  CLI::App* resolve;
  CLI::App* failover;
  CLI::App* failback;
  CLI::App* verify;
  cairn::cli::Drill drill;
  cairn::cli::Group group;
};

Commands DefineCommands(CLI::App& app, Cli& cli, Args& args) {
  app.require_subcommand(1);
  app.add_option("--socket", cli.socket, "cairnd's control socket (env CAIRN_SOCKET)");
  app.add_flag("--json", cli.json, "print JSON for scripts");
  Commands c;

  c.status = app.add_subcommand("status", "state, lag, newest point and throughput per volume");
  c.status->add_option("volume", args.volume, "one volume (default: all)");

  c.points = app.add_subcommand("points", "list the restore points of a volume");
  c.points->add_option("volume", args.volume, "the volume")->required();

  c.restore = app.add_subcommand("restore", "restore a point to a new image at this site");
  c.restore->add_option("volume", args.volume, "the volume")->required();
  c.restore->add_option("point", args.point, "the restore point's seq, or 'latest'")->required();
  c.restore->add_option("--to", args.to, "the new image's name")->required();
  c.restore->add_flag("--full", args.full, "copy all data (default: instant clone)");
  c.restore->add_flag("--force", args.force,
                      "restore a point even though a verify found it differs from its source");

  c.replicate = app.add_subcommand("replicate", "start an epoch now (on the source's cairnd)");
  c.replicate->add_option("volume", args.volume, "the volume")->required();
  c.replicate->add_flag("--wait", args.wait, "wait until the restore point exists");
  c.replicate->add_option("--timeout", args.timeout, "seconds to wait (with --wait)");

  c.promote = app.add_subcommand(
      "promote",
      "failover of one volume: fence it and clone a restore point into an image that "
      "this site then owns (on the standby's cairnd)");
  c.promote->add_option("volume", args.volume, "the volume")->required();
  c.promote->add_option("point", args.promote_point,
                        "the restore point's seq, or 'latest' (default)");
  c.promote->add_option("--to", args.to, "the image to create")->required();

  c.release = app.add_subcommand(
      "release",
      "failback of one volume: lift the fence, keep the promoted image under a new name");
  c.release->add_option("volume", args.volume, "the volume")->required();

  c.resolve = app.add_subcommand(
      "resolve",
      "split brain after a failover: whose writes win (the loser's are kept as a snapshot)");
  c.resolve->add_option("volume", args.volume, "the volume")->required();
  c.resolve->add_option("--keep", args.keep, "the site whose writes win")->required();

  c.failover = app.add_subcommand(
      "failover",
      "promote, then replicate the promoted image back to the other site as soon as it is "
      "reachable (on the standby's cairnd, with a [source] section)");
  c.failover->add_option("volume", args.volume, "the volume")->required();
  c.failover->add_option("point", args.promote_point,
                         "the restore point's seq, or 'latest' (default)");
  c.failover->add_option("--to", args.to, "the image to create")->required();
  c.failover->add_option("--back-to", args.back_to,
                         "the volume's image at the other site (default: the --to name)");
  c.failover->add_flag("--no-back", args.no_back, "do not replicate back");

  c.failback = app.add_subcommand(
      "failback",
      "planned failback with nothing lost: final delta back, the other site's image becomes "
      "the primary, replication resumes from there as a delta (writers detached first)");
  c.failback->add_option("volume", args.volume, "the volume")->required();
  c.failback->add_option("--timeout", args.timeout, "seconds to wait for the final delta");

  c.verify = app.add_subcommand(
      "verify",
      "compare a restore point at the standby with its source snapshot block by block, by "
      "digests only (on the source's cairnd)");
  c.verify->add_option("volume", args.volume, "the volume")->required();
  c.verify->add_option("point", args.promote_point,
                       "the restore point's seq, or 'latest' (default)");
  c.verify->add_flag("--repair", args.repair,
                     "on a mismatch, make a new point sending only the blocks that differ");
  c.verify->add_option("--timeout", args.timeout, "seconds to wait for the verify (and repair)");
  cairn::cli::DefineDrill(app, c.drill);
  cairn::cli::DefineGroup(app, c.group);
  return c;
}

int RunStatus(const Cli& cli, const Args& args) {
  cairn::pb::ControlRequest req;
  req.mutable_status()->set_volume(args.volume);
  auto r = cli.Call(req);
  if (!r.ok()) return cli.Fail(r.status());
  if (cli.json) {
    json out = json::array();
    for (const auto& v : r->status().volumes()) out.push_back(StatusJson(v));
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf("%-20s %-6s %-12s %8s %-21s %9s %12s %7s %7s  %s\n", "VOLUME", "ROLE", "STATE",
              "POINT", "POINT TIME", "LAG", "THROUGHPUT", "ERRORS", "CORRUPT", "LAST ERROR");
  for (const auto& v : r->status().volumes()) {
    std::printf("%-20s %-6s %-12s %8lu %-21s %8.1fs %10s/s %7lu %7lu  %s\n", v.volume().c_str(),
                v.role().c_str(), v.state().c_str(), static_cast<unsigned long>(v.last_seq()),
                Time(v.last_point_time_ns()).c_str(), v.lag_seconds(),
                Bytes(v.throughput_bps()).c_str(), static_cast<unsigned long>(v.errors_total()),
                static_cast<unsigned long>(v.corrupt_frames_total()), v.error().c_str());
  }
  return 0;
}

int RunPoints(const Cli& cli, const Args& args) {
  cairn::pb::ControlRequest req;
  req.mutable_points()->set_volume(args.volume);
  auto r = cli.Call(req);
  if (!r.ok()) return cli.Fail(r.status());
  if (cli.json) {
    json out = json::array();
    for (const auto& p : r->points().points()) out.push_back(PointJson(p));
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf("%8s  %-21s %-28s %12s %12s  %s\n", "POINT", "SOURCE TIME", "SNAPSHOT", "SIZE",
              "DATA", "VERIFIED");
  for (const auto& p : r->points().points()) {
    std::printf("%8lu  %-21s %-28s %12s %12s  %s\n", static_cast<unsigned long>(p.seq()),
                Time(p.source_time_ns()).c_str(),
                fmt::format("{}/{}@{}", p.pool(), p.image(), p.snap()).c_str(),
                Bytes(p.image_size()).c_str(), Bytes(p.data_bytes()).c_str(), Verified(p).c_str());
  }
  return 0;
}

int RunRestore(const Cli& cli, const Args& args) {
  const auto seq = ParsePoint(args.point, args.volume);
  if (!seq.ok()) return cli.Fail(seq.status());
  cairn::pb::ControlRequest req;
  auto* r = req.mutable_restore();
  r->set_volume(args.volume);
  r->set_seq(*seq);
  r->set_to_image(args.to);
  r->set_full(args.full);
  r->set_force(args.force);
  auto reply = cli.Call(req);
  if (!reply.ok()) return cli.Fail(reply.status());
  const auto& rr = reply->restore();
  if (cli.json) {
    std::printf("%s\n", json({{"pool", rr.pool()},
                              {"image", rr.image()},
                              {"seq", rr.seq()},
                              {"mode", rr.mode()},
                              {"source_time", Time(rr.source_time_ns())},
                              {"source_time_ns", rr.source_time_ns()}})
                            .dump(2)
                            .c_str());
  } else {
    std::printf("restored %s point %lu (%s) to %s/%s by %s\n", args.volume.c_str(),
                static_cast<unsigned long>(rr.seq()), Time(rr.source_time_ns()).c_str(),
                rr.pool().c_str(), rr.image().c_str(), rr.mode().c_str());
  }
  return 0;
}

// promote (and failover): the point args name into the image args.to.
cairn::StatusOr<cairn::pb::PromoteReply> Promote(const Cli& cli, const Args& args) {
  ASSIGN_OR_RETURN(const uint64_t seq, ParsePoint(args.promote_point, args.volume));
  cairn::pb::ControlRequest req;
  auto* r = req.mutable_promote();
  r->set_volume(args.volume);
  r->set_seq(seq);
  r->set_to_image(args.to);
  ASSIGN_OR_RETURN(const cairn::pb::ControlReply reply, cli.Call(req));
  return reply.promote();
}

int RunPromote(const Cli& cli, const Args& args) {
  auto reply = Promote(cli, args);
  if (!reply.ok()) return cli.Fail(reply.status());
  const auto& pr = *reply;
  if (cli.json) {
    json out = PointJson(pr.point());
    out["promoted_pool"] = pr.pool();
    out["promoted_image"] = pr.image();
    out["again"] = pr.again();
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::printf("%s: restore point %lu (source time %s) promoted into %s/%s%s\n",
                args.volume.c_str(), static_cast<unsigned long>(pr.point().seq()),
                Time(pr.point().source_time_ns()).c_str(), pr.pool().c_str(), pr.image().c_str(),
                pr.again() ? " (already)" : "");
  }
  return 0;
}

int RunResolve(const Cli& cli, const Args& args) {
  cairn::pb::ControlRequest req;
  req.mutable_resolve()->set_volume(args.volume);
  req.mutable_resolve()->set_keep_site(args.keep);
  auto reply = cli.Call(req);
  if (!reply.ok()) return cli.Fail(reply.status());
  const auto& r = reply->resolve();
  if (cli.json) {
    std::printf("%s\n", json({{"volume", args.volume},
                              {"keep", args.keep},
                              {"kept_as", r.kept_as()},
                              {"outcome", r.outcome()}})
                            .dump()
                            .c_str());
  } else {
    std::printf("%s: %s\n", args.volume.c_str(), r.outcome().c_str());
  }
  return 0;
}

int RunRelease(const Cli& cli, const Args& args) {
  cairn::pb::ControlRequest req;
  req.mutable_release()->set_volume(args.volume);
  auto reply = cli.Call(req);
  if (!reply.ok()) return cli.Fail(reply.status());
  const std::string& kept = reply->release().kept_as();
  if (cli.json) {
    std::printf("%s\n", json({{"volume", args.volume}, {"kept_as", kept}}).dump().c_str());
  } else {
    std::printf("%s: released; the promoted image is kept as %s\n", args.volume.c_str(),
                kept.empty() ? "(nothing: it was removed)" : kept.c_str());
  }
  return 0;
}

// Waits until the source of `volume` holds restore point `want` or a later
// one, and returns the newest it holds; kUnavailable after `timeout`
// seconds.
cairn::StatusOr<uint64_t> WaitForPoint(const Cli& cli, const std::string& volume, uint64_t want,
                                       double timeout, bool progress = false) {
  // Poll the source's status (held in memory: a cheap local call) until
  // the point exists or the deadline passes (a failed step is retried by
  // the source, so its error is reported only then); 10 ms adds little
  // to the wait.
  cairn::Clock& clock = cairn::RealClock();
  const auto deadline =
      clock.Now() + std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000));
  while (true) {
    cairn::pb::ControlRequest req;
    req.mutable_status()->set_volume(volume);
    ASSIGN_OR_RETURN(const cairn::pb::ControlReply s, cli.Call(req));
    uint64_t have = 0;
    std::string error;
    for (const auto& v : s.status().volumes()) {
      if (v.role() == "source") {
        have = v.last_seq();
        error = v.error();
        if (progress) {
          std::fprintf(stderr, "\r%s: restore point %lu: %-12s %10s sent  ", volume.c_str(),
                       static_cast<unsigned long>(want), v.state().c_str(),
                       Bytes(static_cast<double>(v.epoch_sent_bytes())).c_str());
        }
      }
    }
    if (have >= want) {
      if (progress) std::fprintf(stderr, "\n");
      return have;
    }
    if (clock.Now() > deadline) {
      return cairn::Unavailable(fmt::format(
          "restore point {} of {} did not appear within {} s (newest: {}; last error: {})", want,
          volume, timeout, have, error.empty() ? "none" : error));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

int RunFailover(const Cli& cli, const Args& args) {
  auto reply = Promote(cli, args);
  if (!reply.ok()) return cli.Fail(reply.status());
  const auto& pr = *reply;
  json out = {{"volume", args.volume},
              {"seq", pr.point().seq()},
              {"source_time", Time(pr.point().source_time_ns())},
              {"from_site", pr.point().source_site()},
              {"pool", pr.pool()},
              {"image", pr.image()},
              {"again", pr.again()},
              {"back_to", nullptr}};
  std::string back = "not replicated back (--no-back)";
  if (!args.no_back) {
    // Back into the volume's image at the site it came from, from the
    // point both share: as soon as that site's sink answers.
    cairn::pb::ControlRequest reg;
    auto* g = reg.mutable_register_volume();
    g->set_volume(args.volume);
    g->set_pool(pr.pool());
    g->set_image(pr.image());
    g->set_target_pool(pr.pool());
    g->set_target_image(args.back_to.empty() ? args.to : args.back_to);
    auto registered = cli.Call(reg);
    if (registered.ok()) {
      const auto& st = registered->register_volume().status();
      out["back_to"] = fmt::format("{}/{}", pr.pool(), g->target_image());
      back = fmt::format("replicates back to site {} into {}/{} via {} (state {})",
                         pr.point().source_site(), pr.pool(), g->target_image(), st.peer(),
                         st.state());
    } else {
      out["back_error"] = registered.status().message();
      back = fmt::format("NOT replicated back: {}", registered.status().message());
    }
  }
  if (cli.json) {
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::printf("%s: FAILED OVER: restore point %lu (source time %s) is now %s/%s%s; %s\n",
                args.volume.c_str(), static_cast<unsigned long>(pr.point().seq()),
                Time(pr.point().source_time_ns()).c_str(), pr.pool().c_str(), pr.image().c_str(),
                pr.again() ? " (promoted before)" : "", back.c_str());
  }
  return 0;
}

int RunFailback(const Cli& cli, const Args& args) {
  // The final delta: a point holding every write made before now.
  cairn::pb::ControlRequest req;
  req.mutable_replicate()->set_volume(args.volume);
  auto replicated = cli.Call(req);
  if (!replicated.ok()) return cli.Fail(replicated.status());
  auto have = WaitForPoint(cli, args.volume, replicated->replicate().seq(), args.timeout,
                           !cli.json && isatty(STDERR_FILENO));
  if (!have.ok()) return cli.Fail(have.status());
  cairn::pb::ControlRequest fb;
  fb.mutable_failback()->set_volume(args.volume);
  fb.mutable_failback()->set_seq(*have);
  auto reply = cli.Call(fb);
  if (!reply.ok()) return cli.Fail(reply.status());
  const auto& r = reply->failback();
  if (cli.json) {
    std::printf("%s\n", json({{"volume", args.volume},
                              {"seq", r.seq()},
                              {"primary_site", r.primary_site()},
                              {"kept_as", r.kept_as()},
                              {"copied_bytes", r.copied_bytes()}})
                            .dump(2)
                            .c_str());
  } else {
    std::printf(
        "%s: FAILED BACK to site %s at restore point %lu, nothing lost; replication from there "
        "resumes as a delta from that point (%s taken into the standby image here); the "
        "promoted image is kept as %s\n",
        args.volume.c_str(), r.primary_site().c_str(), static_cast<unsigned long>(r.seq()),
        Bytes(static_cast<double>(r.copied_bytes())).c_str(), r.kept_as().c_str());
  }
  return 0;
}

int RunReplicate(const Cli& cli, const Args& args) {
  cairn::pb::ControlRequest req;
  req.mutable_replicate()->set_volume(args.volume);
  auto reply = cli.Call(req);
  if (!reply.ok()) return cli.Fail(reply.status());
  // Point `want`, or any later one, holds every write made before the
  // request (a snapshot taken during an outage may be dropped unshipped).
  uint64_t want = reply->replicate().seq();
  if (args.wait) {
    auto have = WaitForPoint(cli, args.volume, want, args.timeout);
    if (!have.ok()) return cli.Fail(have.status());
    want = *have;
  }
  if (cli.json) {
    std::printf(
        "%s\n",
        json({{"volume", args.volume}, {"seq", want}, {"waited", args.wait}}).dump().c_str());
  } else {
    std::printf("%s: restore point %lu %s\n", args.volume.c_str(), static_cast<unsigned long>(want),
                args.wait ? "is made" : "requested");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Cli cli;
  const char* env_socket = std::getenv("CAIRN_SOCKET");
  cli.socket = env_socket ? env_socket : "/run/cairn/cairnd.sock";
  Args args;
  CLI::App app{"cairn: cross-site replication of Ceph RBD volumes"};
  Commands c = DefineCommands(app, cli, args);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (*c.status) return RunStatus(cli, args);
  if (*c.points) return RunPoints(cli, args);
  if (*c.restore) return RunRestore(cli, args);
  if (*c.promote) return RunPromote(cli, args);
  if (*c.release) return RunRelease(cli, args);
  if (*c.resolve) return RunResolve(cli, args);
  if (*c.replicate) return RunReplicate(cli, args);
  if (*c.failover) return RunFailover(cli, args);
  if (*c.failback) return RunFailback(cli, args);
  if (auto drilled = cairn::cli::RunDrill(cli, c.drill)) return *drilled;
  if (auto grouped = cairn::cli::RunGroup(cli, c.group)) return *grouped;
  if (*c.verify) {
    const auto seq = ParsePoint(args.promote_point, args.volume);
    if (!seq.ok()) return cli.Fail(seq.status());
    return cairn::cli::RunVerify(cli, args.volume, *seq, args.repair, args.timeout);
  }
  return 2;
}
