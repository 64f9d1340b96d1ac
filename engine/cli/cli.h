// The cairn command line's shared parts: the control socket client, exit
// codes and the formats every subcommand prints with.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "engine/base/status.h"
#include "proto/cairn.pb.h"

namespace CLI {
class App;
}  // namespace CLI

namespace cairn::cli {

// Exit codes (scripts may rely on them): 0 success; 1 internal error;
// 2 usage error; 3 not found; 4 cairnd or a peer unavailable (retry);
// 5 operator action needed (bad input, failed precondition); 6 already
// exists; 7 data failed verification; 8 permission denied.
int ExitCode(Code c);

struct Cli {
  std::string socket;
  bool json = false;

  // Prints the error (as JSON with --json) and returns its exit code.
  int Fail(const Status& st) const;
  // One request, one reply; a reply with an error code becomes its status.
  StatusOr<pb::ControlReply> Call(const pb::ControlRequest& req) const;
};

// The seq a POINT argument names: 0 for "latest"; kInvalidArgument, naming
// `volume`'s points, otherwise.
StatusOr<uint64_t> ParsePoint(const std::string& point, const std::string& volume);

// "2026-12-06T22:45:02Z"; "-" for 0.
std::string Time(int64_t ns);
// "1.5 GiB"
std::string Bytes(double b);

// cairn drill start|stop (cairn_drill.cc), on the standby's cairnd.
struct Drill {
  CLI::App* start = nullptr;
  CLI::App* stop = nullptr;
  std::string volume;
  std::string point = "latest";
  std::string image;
};
// Adds `drill start VOLUME [POINT] [--to IMAGE]` and `drill stop VOLUME
// [--image IMAGE]` to `app`; the parse fills `d`.
void DefineDrill(CLI::App& app, Drill& d);
// Runs the drill subcommand given, if one was; nullopt if none.
std::optional<int> RunDrill(const Cli& cli, const Drill& d);

// cairn group status|points|replicate|restore (cairn_group.cc).
struct Group {
  CLI::App* status = nullptr;
  CLI::App* points = nullptr;
  CLI::App* replicate = nullptr;
  CLI::App* restore = nullptr;
  CLI::App* drill_start = nullptr;
  CLI::App* drill_stop = nullptr;
  CLI::App* failover = nullptr;
  CLI::App* failback = nullptr;
  std::string group;
  std::vector<std::string> back;  // failover: VOLUME=POOL/IMAGE at home
  std::string point = "latest";
  std::string suffix;
  bool full = false;
  bool force = false;
  bool wait = false;
  double timeout = 300;
};
void DefineGroup(CLI::App& app, Group& g);
// Runs the group subcommand given, if one was; nullopt if none.
std::optional<int> RunGroup(const Cli& cli, const Group& g);

// A volume's verify as `cairn status --json` shows it (null: none).
nlohmann::json VerifyJson(const pb::VerifyStatus& v);

// cairn verify (cairn_verify.cc): starts a verify of restore point `seq`
// (0: the newest) at the source's cairnd, shows its progress on a terminal,
// waits for its end (and, with `repair`, for the point that repairs a
// mismatch) up to `timeout` seconds. Exit 0: the point equals its source
// (or was repaired); 7: it differs.
int RunVerify(const Cli& cli, const std::string& volume, uint64_t seq, bool repair, double timeout);

}  // namespace cairn::cli
