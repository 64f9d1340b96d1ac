// cairn verify: asks the source's cairnd to compare a restore point with
// its source snapshot (by block digests, no data shipped), follows the
// verify in the volume's status, and says what it found.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "engine/base/clock.h"
#include "engine/cli/cli.h"

namespace cairn::cli {
namespace {

using nlohmann::json;

// The source's verify status of `volume`.
StatusOr<pb::VerifyStatus> VerifyOf(const Cli& cli, const std::string& volume) {
  pb::ControlRequest req;
  req.mutable_status()->set_volume(volume);
  ASSIGN_OR_RETURN(const pb::ControlReply r, cli.Call(req));
  for (const auto& v : r.status().volumes()) {
    if (v.role() == "source") return v.verify();
  }
  return NotFound(fmt::format("volume '{}' has no source here", volume));
}

void ShowProgress(const std::string& volume, const pb::VerifyStatus& v) {
  const double frac = v.total_bytes() ? double(v.done_bytes()) / double(v.total_bytes()) : 0;
  const int width = 30;
  const int filled = static_cast<int>(frac * width);
  std::fprintf(
      stderr, "\r%s: point %lu [%s%s] %3.0f%% %s of %s, %lu grains differ  ", volume.c_str(),
      static_cast<unsigned long>(v.seq()), std::string(filled, '#').c_str(),
      std::string(width - filled, '.').c_str(), frac * 100, Bytes(double(v.done_bytes())).c_str(),
      Bytes(double(v.total_bytes())).c_str(), static_cast<unsigned long>(v.mismatched_grains()));
}

// Whether the verify `id` is over (and its repair made, if one was asked).
bool Ended(const pb::VerifyStatus& v, uint64_t id) {
  if (v.id() != id) return false;
  if (v.running()) return false;
  if (v.repair() && v.mismatched_grains() > 0 && v.error().empty()) return v.repaired_seq() != 0;
  return true;
}

int Report(const Cli& cli, const std::string& volume, const pb::VerifyStatus& v) {
  if (cli.json) {
    json out = VerifyJson(v);
    out["volume"] = volume;
    std::printf("%s\n", out.dump(2).c_str());
  } else if (v.mismatched_grains() == 0) {
    std::printf("%s: restore point %lu equals its source (%s compared in %.1f s, %s/s)\n",
                volume.c_str(), static_cast<unsigned long>(v.seq()),
                Bytes(double(v.total_bytes())).c_str(), v.seconds(),
                Bytes(v.seconds() > 0 ? double(v.total_bytes()) / v.seconds() : 0).c_str());
  } else {
    std::printf("%s: restore point %lu DIFFERS from its source in %lu grains of %s:\n",
                volume.c_str(), static_cast<unsigned long>(v.seq()),
                static_cast<unsigned long>(v.mismatched_grains()),
                Bytes(double(v.grain())).c_str());
    for (int i = 0; i < v.mismatch_offsets_size() && i < v.mismatch_lengths_size(); ++i) {
      std::printf("  at byte %lu, %s\n", static_cast<unsigned long>(v.mismatch_offsets(i)),
                  Bytes(double(v.mismatch_lengths(i))).c_str());
    }
    if (v.repaired_seq() != 0) {
      std::printf(
          "repaired: restore point %lu holds the source's data (only the blocks that differ were "
          "sent); point %lu is kept, marked as differing\n",
          static_cast<unsigned long>(v.repaired_seq()), static_cast<unsigned long>(v.seq()));
    } else {
      std::printf("repair it with `cairn verify %s --repair`\n", volume.c_str());
    }
  }
  if (v.mismatched_grains() == 0 || v.repaired_seq() != 0) return 0;
  return ExitCode(Code::kDataLoss);
}

}  // namespace

json VerifyJson(const pb::VerifyStatus& v) {
  if (v.id() == 0) return nullptr;
  json ranges = json::array();
  for (int i = 0; i < v.mismatch_offsets_size() && i < v.mismatch_lengths_size(); ++i) {
    ranges.push_back({{"offset", v.mismatch_offsets(i)}, {"length", v.mismatch_lengths(i)}});
  }
  return {{"id", v.id()},
          {"seq", v.seq()},
          {"running", v.running()},
          {"done_bytes", v.done_bytes()},
          {"total_bytes", v.total_bytes()},
          {"mismatched_grains", v.mismatched_grains()},
          {"grain", v.grain()},
          {"mismatches", ranges},
          {"error", v.error()},
          {"seconds", v.seconds()},
          {"repair", v.repair()},
          {"repaired_seq", v.repaired_seq()}};
}

int RunVerify(const Cli& cli, const std::string& volume, uint64_t seq, bool repair,
              double timeout) {
  pb::ControlRequest req;
  auto* q = req.mutable_verify();
  q->set_volume(volume);
  q->set_seq(seq);
  q->set_repair(repair);
  auto started = cli.Call(req);
  if (!started.ok()) return cli.Fail(started.status());
  const uint64_t id = started->verify().id();
  const bool bar = !cli.json && isatty(STDERR_FILENO);
  Clock& clock = RealClock();
  const auto deadline =
      clock.Now() + std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000));
  while (true) {
    auto v = VerifyOf(cli, volume);
    if (!v.ok()) return cli.Fail(v.status());
    if (bar && v->id() == id) ShowProgress(volume, *v);
    if (Ended(*v, id)) {
      if (bar) std::fprintf(stderr, "\n");
      if (!v->error().empty()) {
        return cli.Fail(FailedPrecondition(
            fmt::format("verify of restore point {} of {}: {}", v->seq(), volume, v->error())));
      }
      return Report(cli, volume, *v);
    }
    if (clock.Now() > deadline) {
      if (bar) std::fprintf(stderr, "\n");
      return cli.Fail(Unavailable(fmt::format(
          "the verify of restore point {} of {} did not end within {} s ({} of {} bytes "
          "compared{}); it goes on: see `cairn status {} --json`",
          v->seq(), volume, timeout, v->done_bytes(), v->total_bytes(),
          v->running() ? "" : ", waiting for the repair", volume)));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the polling period
  }
}

}  // namespace cairn::cli
