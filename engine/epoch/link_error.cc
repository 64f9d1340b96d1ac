// LinkError frames (see epoch.h): how either end of an epoch stream tells
// the other why it stops.
#include <fmt/format.h>

#include "engine/epoch/epoch.h"
#include "proto/cairn.pb.h"

namespace cairn {

Status WriteLinkError(FrameWriter& out, const Status& st) {
  pb::LinkError e;
  e.set_code(static_cast<int32_t>(st.code()));
  e.set_message(st.message());
  return out.Write(FrameType::kLinkError, e.SerializeAsString(), {});
}

Status StatusFromLinkError(const Frame& f, std::string_view who) {
  pb::LinkError e;
  if (!e.ParseFromString(f.body)) return DataLoss(fmt::format("{}: malformed LinkError", who));
  const Code code = static_cast<Code>(e.code());
  if (code == Code::kOk || CodeName(code) == "Unknown") {
    return Internal(fmt::format("{}: error with invalid code {}: {}", who, e.code(), e.message()));
  }
  return Status(code, fmt::format("{}: {}", who, e.message()));
}

}  // namespace cairn
