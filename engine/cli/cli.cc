#include "engine/cli/cli.h"

#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>

#include "engine/link/tcp_link.h"

namespace cairn::cli {

int ExitCode(Code c) {
  switch (c) {
    case Code::kOk:
      return 0;
    case Code::kNotFound:
      return 3;
    case Code::kUnavailable:
    case Code::kAborted:
      return 4;
    case Code::kInvalidArgument:
    case Code::kFailedPrecondition:
    case Code::kResourceExhausted:
      return 5;
    case Code::kAlreadyExists:
      return 6;
    case Code::kDataLoss:
      return 7;
    case Code::kPermissionDenied:
      return 8;
    case Code::kInternal:
      return 1;
  }
  return 1;
}

int Cli::Fail(const Status& st) const {
  if (json) {
    std::printf("%s\n", nlohmann::json::object({{"error", std::string(CodeName(st.code()))},
                                                {"message", st.message()}})
                            .dump()
                            .c_str());
  } else {
    std::fprintf(stderr, "cairn: %s\n", st.message().c_str());
  }
  return ExitCode(st.code());
}

StatusOr<pb::ControlReply> Cli::Call(const pb::ControlRequest& req) const {
  ASSIGN_OR_RETURN(auto link, ConnectUnix(socket));
  RETURN_IF_ERROR(link->Send(FrameType::kControlRequest, req.SerializeAsString(), {}));
  // A full restore copies the whole image before it answers.
  ASSIGN_OR_RETURN(Frame f, link->Receive(std::chrono::hours(24)));
  pb::ControlReply reply;
  if (f.type != FrameType::kControlReply || !reply.ParseFromString(f.body)) {
    return DataLoss(fmt::format("{} did not answer with a control reply", socket));
  }
  if (reply.code() != 0) return Status(static_cast<Code>(reply.code()), reply.message());
  return reply;
}

// The seq a POINT argument names: 0 for "latest".
StatusOr<uint64_t> ParsePoint(const std::string& point, const std::string& volume) {
  if (point == "latest") return 0;
  try {
    size_t used = 0;
    const uint64_t seq = std::stoull(point, &used);
    if (used != point.size() || seq == 0) throw std::invalid_argument(point);
    return seq;
  } catch (const std::exception&) {
    return InvalidArgument(fmt::format(
        "'{}' is not a restore point: give its number (see `cairn points {}`) or 'latest'", point,
        volume));
  }
}

std::string Time(int64_t ns) {
  if (ns <= 0) return "-";
  const std::time_t t = ns / 1'000'000'000;
  std::tm tm;
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string Bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int i = 0;
  while (b >= 1024 && i < 4) {
    b /= 1024;
    ++i;
  }
  return fmt::format("{:.1f} {}", b, units[i]);
}

}  // namespace cairn::cli
