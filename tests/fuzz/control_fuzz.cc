// libFuzzer target: the control API decoder. A malformed request must get a
// reply with an error code, never a crash.
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/daemon/control.h"

namespace {

class NullService final : public cairn::ControlService {
 public:
  cairn::StatusOr<std::vector<cairn::VolumeStatusInfo>> VolumeStatus(const std::string&) override {
    return std::vector<cairn::VolumeStatusInfo>(1);
  }
  cairn::StatusOr<std::vector<cairn::RestorePoint>> Points(const std::string& v) override {
    if (auto st = cairn::ValidateVolumeId(v); !st.ok()) return st;
    return std::vector<cairn::RestorePoint>(1);
  }
  cairn::StatusOr<cairn::DrillResult> DrillStart(const std::string&, uint64_t,
                                                 const std::string&) override {
    return cairn::NotFound("no such volume");
  }
  cairn::StatusOr<std::vector<std::string>> DrillStop(const std::string&,
                                                      const std::string&) override {
    return cairn::NotFound("no such volume");
  }
  cairn::StatusOr<VerifyStarted> Verify(const std::string&, uint64_t, bool) override {
    return cairn::NotFound("no such volume");
  }
  cairn::StatusOr<cairn::RestoreResult> Restore(const std::string&, uint64_t, const std::string&,
                                                bool, bool) override {
    return cairn::NotFound("no such point");
  }
  cairn::StatusOr<uint64_t> Replicate(const std::string&) override { return uint64_t{1}; }
  cairn::StatusOr<cairn::VolumeStatusInfo> Register(const cairn::Registration& r) override {
    if (auto st = cairn::ValidateVolumeId(r.volume); !st.ok()) return st;
    return cairn::VolumeStatusInfo{};
  }
  cairn::Status Unregister(const std::string& v, bool) override {
    return cairn::ValidateVolumeId(v);
  }
  cairn::StatusOr<cairn::PromoteResult> Promote(const std::string& v, uint64_t, const std::string&,
                                                const std::string&) override {
    if (auto st = cairn::ValidateVolumeId(v); !st.ok()) return st;
    return cairn::PromoteResult{};
  }
  cairn::StatusOr<std::string> Release(const std::string&) override {
    return cairn::FailedPrecondition("not promoted");
  }
  cairn::StatusOr<Resolved> Resolve(const std::string&, const std::string&) override {
    return cairn::FailedPrecondition("not promoted");
  }
  cairn::StatusOr<FailedBack> Failback(const std::string&, uint64_t) override {
    return cairn::FailedPrecondition("not promoted");
  }
  cairn::StatusOr<std::vector<cairn::GroupStatusInfo>> GroupStatus(const std::string&) override {
    return std::vector<cairn::GroupStatusInfo>{};
  }
  cairn::StatusOr<uint64_t> ReplicateGroup(const std::string&) override {
    return cairn::NotFound("no such group");
  }
  cairn::StatusOr<std::vector<cairn::GroupPoint>> GroupPoints(const std::string&) override {
    return std::vector<cairn::GroupPoint>{};
  }
  cairn::StatusOr<std::vector<cairn::RestoreResult>> RestoreGroup(const std::string&, uint64_t,
                                                                  const std::string&, bool,
                                                                  bool) override {
    return cairn::NotFound("no such group");
  }
  cairn::StatusOr<GroupImages> DrillGroup(const std::string&, uint64_t, bool) override {
    return cairn::NotFound("no such group");
  }
  cairn::StatusOr<GroupImages> PromoteGroup(const std::string&, uint64_t,
                                            const std::string&) override {
    return cairn::NotFound("no such group");
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static NullService service;
  cairn::Frame f;
  f.type = cairn::FrameType::kControlRequest;
  f.body.assign(reinterpret_cast<const char*>(data), size);
  // Every request as an admin's (all run), then as a reader's (changes refused).
  std::string reply = cairn::HandleControl(service, f, {true, "fuzz"});
  reply += cairn::HandleControl(service, f, {false, "fuzz"});
  if (reply.empty() && size > 0) __builtin_trap();  // a reply always has a code or a payload
  return 0;
}
