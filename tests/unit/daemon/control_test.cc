// The control socket's access (engine/daemon/control.h, Listener::ListenUnix):
// every caller may read, only an admin may change, and the kernel says who
// the caller is (SO_PEERCRED), checked with a child process that connects
// as the user nobody.
#include "engine/daemon/control.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>

#include "engine/link/tcp_link.h"
#include "proto/cairn.pb.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

constexpr uint32_t kNobody = 65534;  // uid nobody, gid nogroup (Debian)

// Counts what ran; answers with empty results.
class CountingService final : public ControlService {
 public:
  StatusOr<std::vector<VolumeStatusInfo>> VolumeStatus(const std::string&) override {
    ++reads;
    return std::vector<VolumeStatusInfo>{};
  }
  StatusOr<std::vector<RestorePoint>> Points(const std::string&) override {
    ++reads;
    return std::vector<RestorePoint>{};
  }
  StatusOr<DrillResult> DrillStart(const std::string&, uint64_t, const std::string&) override {
    ++changes;
    return DrillResult{};
  }
  StatusOr<std::vector<std::string>> DrillStop(const std::string&, const std::string&) override {
    ++changes;
    return std::vector<std::string>{};
  }
  StatusOr<VerifyStarted> Verify(const std::string&, uint64_t, bool) override {
    ++changes;
    return VerifyStarted{1, 1};
  }
  StatusOr<RestoreResult> Restore(const std::string&, uint64_t, const std::string&, bool,
                                  bool) override {
    ++changes;
    return RestoreResult{};
  }
  StatusOr<uint64_t> Replicate(const std::string&) override {
    ++changes;
    return 1;
  }
  StatusOr<VolumeStatusInfo> Register(const Registration&) override {
    ++changes;
    return VolumeStatusInfo{};
  }
  Status Unregister(const std::string&, bool) override {
    ++changes;
    return OkStatus();
  }
  StatusOr<PromoteResult> Promote(const std::string&, uint64_t, const std::string&,
                                  const std::string&) override {
    ++changes;
    return PromoteResult{};
  }
  StatusOr<std::string> Release(const std::string&) override {
    ++changes;
    return std::string("kept");
  }
  StatusOr<Resolved> Resolve(const std::string&, const std::string&) override {
    ++changes;
    return Resolved{};
  }
  StatusOr<FailedBack> Failback(const std::string&, uint64_t) override {
    ++changes;
    return FailedBack{};
  }
  StatusOr<std::vector<GroupStatusInfo>> GroupStatus(const std::string&) override {
    ++reads;
    return std::vector<GroupStatusInfo>{};
  }
  StatusOr<uint64_t> ReplicateGroup(const std::string&) override {
    ++changes;
    return 1;
  }
  StatusOr<std::vector<GroupPoint>> GroupPoints(const std::string&) override {
    ++reads;
    return std::vector<GroupPoint>{};
  }
  StatusOr<std::vector<RestoreResult>> RestoreGroup(const std::string&, uint64_t,
                                                    const std::string&, bool, bool) override {
    ++changes;
    return std::vector<RestoreResult>{};
  }
  StatusOr<GroupImages> DrillGroup(const std::string&, uint64_t, bool) override {
    ++changes;
    return GroupImages{};
  }
  StatusOr<GroupImages> PromoteGroup(const std::string&, uint64_t, const std::string&) override {
    ++changes;
    return GroupImages{};
  }
  StatusOr<std::vector<VolumeStatusInfo>> ReplicateGroupBack(
      const std::string& group, const std::vector<Registration>& back) override {
    ++changes;
    back_group = group;
    back_asked = back;
    return std::vector<VolumeStatusInfo>(back.size());
  }
  StatusOr<GroupFailedBack> FailbackGroup(const std::string&, uint64_t seq) override {
    ++changes;
    return GroupFailedBack{seq, "a", {"rbd/x.failback-t"}};
  }
  int reads = 0;
  int changes = 0;
  std::string back_group;
  std::vector<Registration> back_asked;
};

Frame Request(const pb::ControlRequest& r) {
  Frame f;
  f.type = FrameType::kControlRequest;
  f.body = r.SerializeAsString();
  return f;
}

pb::ControlReply Ask(ControlService& service, const pb::ControlRequest& r,
                     const ControlCaller& caller) {
  pb::ControlReply reply;
  EXPECT_TRUE(reply.ParseFromString(HandleControl(service, Request(r), caller)));
  return reply;
}

TEST(Control, ReadersReadAndOnlyAdminsChange) {
  CountingService service;
  const ControlCaller reader{false, "pid 1 uid 1000 (cinder)"};
  const ControlCaller admin{true, "pid 2 uid 0 (root)"};
  pb::ControlRequest status, points, promote, release, replicate, restore, resolve, failback,
      register_many;
  status.mutable_status();
  points.mutable_points()->set_volume("v");
  promote.mutable_promote()->set_volume("v");
  release.mutable_release()->set_volume("v");
  replicate.mutable_replicate()->set_volume("v");
  restore.mutable_restore()->set_volume("v");
  resolve.mutable_resolve()->set_volume("v");
  failback.mutable_failback()->set_volume("v");
  for (const char* v : {"v1", "v2"}) {
    auto* r = register_many.mutable_register_volumes()->add_volumes();
    r->set_volume(v);
    r->set_group("g");
  }
  EXPECT_EQ(Ask(service, status, reader).code(), 0);
  EXPECT_EQ(Ask(service, points, reader).code(), 0);
  EXPECT_EQ(service.reads, 2);
  const auto all = {&promote, &release, &replicate, &restore, &resolve, &failback, &register_many};
  for (const auto* r : all) {
    const pb::ControlReply reply = Ask(service, *r, reader);
    EXPECT_EQ(reply.code(), static_cast<int>(Code::kPermissionDenied));
    EXPECT_THAT(reply.message(), HasSubstr("admin_group"));
    EXPECT_THAT(reply.message(), HasSubstr("uid 1000 (cinder)"));
  }
  EXPECT_EQ(service.changes, 0) << "a reader's request changed something";
  for (const auto* r : all) EXPECT_EQ(Ask(service, *r, admin).code(), 0);
  EXPECT_EQ(service.changes, 8);  // register_volumes: each volume's (by default)
  EXPECT_EQ(Ask(service, register_many, admin).register_volumes().status_size(), 2);
}

// A group failed over comes home: its members' targets at home reach the
// service as registrations; the failback answers its point and the images
// kept; a reader may do neither.
TEST(Control, AGroupReplicatesBackAndFailsBackOnlyForAnAdmin) {
  CountingService service;
  const ControlCaller reader{false, "pid 1 uid 1000 (cinder)"};
  const ControlCaller admin{true, "pid 2 uid 0 (root)"};
  pb::ControlRequest back, failback;
  back.mutable_group()->set_group("g");
  back.mutable_group()->set_action(pb::GroupRequest::REPLICATE_BACK);
  auto* v = back.mutable_group()->mutable_back()->add_volumes();
  v->set_volume("v1");
  v->set_target_pool("rbd");
  v->set_target_image("volume-v1");
  v->mutable_retention()->set_keep_points(3);
  v->mutable_retention()->set_tiers("1h*24");
  failback.mutable_group()->set_group("g");
  failback.mutable_group()->set_action(pb::GroupRequest::FAILBACK);
  failback.mutable_group()->set_seq(7);
  for (const auto* r : {&back, &failback}) {
    EXPECT_EQ(Ask(service, *r, reader).code(), static_cast<int>(Code::kPermissionDenied));
  }
  EXPECT_EQ(service.changes, 0);

  EXPECT_EQ(Ask(service, back, admin).group().back_size(), 1);
  EXPECT_EQ(service.back_group, "g");
  ASSERT_EQ(service.back_asked.size(), 1u);
  EXPECT_EQ(service.back_asked[0].volume, "v1");
  EXPECT_EQ(service.back_asked[0].target_pool, "rbd");
  EXPECT_EQ(service.back_asked[0].target_image, "volume-v1");
  ASSERT_TRUE(service.back_asked[0].retention);
  EXPECT_EQ(service.back_asked[0].retention->keep_last, 3u);
  const pb::ControlReply done = Ask(service, failback, admin);
  EXPECT_EQ(done.code(), 0);
  EXPECT_EQ(done.group().seq(), 7u);
  EXPECT_EQ(done.group().primary_site(), "a");
  ASSERT_EQ(done.group().images_size(), 1);
  EXPECT_EQ(done.group().images(0), "rbd/x.failback-t");

  v->set_snapshot_retention("1x*2");  // no such period: refused before the service
  EXPECT_EQ(Ask(service, back, admin).code(), static_cast<int>(Code::kInvalidArgument));
  EXPECT_EQ(service.changes, 2);
}

TEST(Control, AdminsAreRootOurselvesOrMembersOfTheAdminGroup) {
  EXPECT_TRUE(CallerOf({1, 0, 0}, std::nullopt).admin);
  EXPECT_TRUE(CallerOf({1, ::geteuid(), 0}, std::nullopt).admin);
  EXPECT_FALSE(CallerOf({1, kNobody, kNobody}, std::nullopt).admin);
  EXPECT_TRUE(CallerOf({1, kNobody, kNobody}, kNobody).admin);  // its primary group
  EXPECT_FALSE(CallerOf({1, kNobody, kNobody}, 0u).admin);      // nobody is not in root
  EXPECT_THAT(CallerOf({42, kNobody, kNobody}, std::nullopt).who,
              HasSubstr("pid 42 uid 65534 (nobody)"));
}

// Connects to `path` as uid/gid nobody in a child process (raw syscalls
// only: the parent has threads); returns the child's exit status.
int ConnectAsNobody(const std::string& path) {
  const pid_t pid = fork();
  if (pid == 0) {
    if (setgid(kNobody) != 0 || setuid(kNobody) != 0) _exit(2);
    const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) _exit(3);
    char b = 0;
    _exit(read(fd, &b, 1) >= 0 ? 0 : 4);  // until the parent closes
  }
  int st = 0;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 100;
}

TEST(Control, SocketHasItsModeAndGroupAndTheKernelNamesTheCaller) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to connect as another user";
  char tmpl[] = "/tmp/cairn-control.XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  ::chmod(dir.c_str(), 0755);
  const std::string path = dir + "/cairnd.sock";
  {
    auto l = Listener::ListenUnix(path, {}, 0660, kNobody);
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0660u);
    EXPECT_EQ(st.st_gid, kNobody);
    StatusOr<std::unique_ptr<Link>> accepted = Internal("not accepted");
    std::thread t([&] { accepted = (*l)->Accept(); });
    std::thread child([&] { EXPECT_EQ(ConnectAsNobody(path), 0); });
    t.join();
    ASSERT_TRUE(accepted.ok()) << accepted.status().ToString();
    const auto creds = (*accepted)->credentials();
    ASSERT_TRUE(creds.has_value());
    EXPECT_EQ(creds->uid, kNobody);
    EXPECT_EQ(creds->gid, kNobody);
    EXPECT_GT(creds->pid, 0);
    (*accepted)->Close();
    accepted->reset();
    child.join();
  }
  {
    // 0600: nobody may not even connect.
    auto l = Listener::ListenUnix(path, {}, 0600);
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    EXPECT_EQ(ConnectAsNobody(path), 3);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace cairn
