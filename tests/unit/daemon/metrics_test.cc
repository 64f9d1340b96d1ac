// RenderMetrics: the Prometheus text format, and MetricsServer answering
// it over real HTTP on loopback.
#include "engine/daemon/metrics.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>

#include "engine/daemon/metrics_http.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

MetricsInput Input() {
  MetricsInput in;
  in.site = "a";
  in.now_ns = 10'000'000'000;
  VolumeStatusInfo v;
  v.volume = "vol\"1";
  v.role = "source";
  v.state = VolumeState::kSyncing;
  v.last_seq = 7;
  v.last_point_time_ns = 4'000'000'000;
  v.lag_seconds = 2.5;
  v.bytes_total = 1u << 30;
  v.epochs_total = 3;
  v.CountEpochSeconds(0.05);
  v.CountEpochSeconds(3);
  v.CountEpochSeconds(1000);
  in.volumes.push_back(v);
  VolumeStatusInfo fresh;
  fresh.volume = "fresh";
  fresh.role = "sink";
  fresh.state = VolumeState::kError;
  in.volumes.push_back(fresh);
  in.spool_bytes["fresh"] = 4096;
  return in;
}

TEST(Metrics, GaugesCountersAndAHistogramPerVolume) {
  const std::string page = RenderMetrics(Input());
  const std::string v = R"({site="a",volume="vol\"1",role="source")";
  EXPECT_THAT(page, HasSubstr("# TYPE cairn_volume_lag_seconds gauge\n"));
  EXPECT_THAT(page, HasSubstr("cairn_volume_lag_seconds" + v + "} 2.5\n"));
  EXPECT_THAT(page, HasSubstr("cairn_volume_point_age_seconds" + v + "} 6\n"));
  EXPECT_THAT(page, HasSubstr("# TYPE cairn_volume_bytes_total counter\n"));
  EXPECT_THAT(page, HasSubstr("cairn_volume_bytes_total" + v + "} 1073741824\n"));
  EXPECT_THAT(page, HasSubstr("cairn_volume_state" + v + R"(,state="syncing"} 1)"));
  EXPECT_THAT(page, HasSubstr("cairn_volume_state" + v + R"(,state="idle"} 0)"));
  // Cumulative buckets: 0.05 s, 3 s and 1000 s.
  EXPECT_THAT(page,
              HasSubstr("cairn_volume_epoch_duration_seconds_bucket" + v + R"(,le="0.1"} 1)"));
  EXPECT_THAT(page,
              HasSubstr("cairn_volume_epoch_duration_seconds_bucket" + v + R"(,le="2.5"} 1)"));
  EXPECT_THAT(page, HasSubstr("cairn_volume_epoch_duration_seconds_bucket" + v + R"(,le="5"} 2)"));
  EXPECT_THAT(page,
              HasSubstr("cairn_volume_epoch_duration_seconds_bucket" + v + R"(,le="600"} 2)"));
  EXPECT_THAT(page,
              HasSubstr("cairn_volume_epoch_duration_seconds_bucket" + v + R"(,le="+Inf"} 3)"));
  EXPECT_THAT(page, HasSubstr("cairn_volume_epoch_duration_seconds_count" + v + "} 3\n"));
  // A volume without a point has no lag (an alert on the lag would read
  // it as fresh): has_point says so instead.
  const std::string f = R"({site="a",volume="fresh",role="sink"})";
  EXPECT_THAT(page, Not(HasSubstr("cairn_volume_lag_seconds" + f)));
  EXPECT_THAT(page, HasSubstr("cairn_volume_has_point" + f + " 0\n"));
  EXPECT_THAT(page, HasSubstr("cairn_volume_up" + f + " 0\n"));
  EXPECT_THAT(page, HasSubstr("cairn_spool_bytes" + f + " 4096\n"));
}

TEST(Metrics, TheLastVerifysVerdictOnlyOnceItEnded) {
  MetricsInput in = Input();
  const std::string v = R"({site="a",volume="vol\"1",role="source"})";
  in.volumes[0].verify.id = 1;
  in.volumes[0].verify.seq = 7;
  in.volumes[0].verify.running = true;
  EXPECT_THAT(RenderMetrics(in), Not(HasSubstr("cairn_volume_verify_mismatched_grains" + v)));
  in.volumes[0].verify.running = false;
  in.volumes[0].verify.mismatched_grains = 3;
  const std::string page = RenderMetrics(in);
  EXPECT_THAT(page, HasSubstr("cairn_volume_verify_mismatched_grains" + v + " 3\n"));
  EXPECT_THAT(page, HasSubstr("cairn_volume_verify_seq" + v + " 7\n"));
  in.volumes[0].verify.error = "Unavailable: the sink did not answer";
  EXPECT_THAT(RenderMetrics(in), Not(HasSubstr("cairn_volume_verify_mismatched_grains" + v)));
}

TEST(Metrics, GroupsTheirNewestWholeInstantAndWhoTheyWaitFor) {
  MetricsInput in = Input();
  GroupStatusInfo g;
  g.group = "db1";
  g.last_seq = 12;
  g.last_time_ns = in.now_ns - 4'000'000'000;
  g.unchanged_at_ns = in.now_ns - 1'000'000'000;  // found unchanged since, 1 s ago
  g.waiting_for = {"db1-log"};
  g.error = "FailedPrecondition: group db1 in pool rbd: ...";
  in.groups.push_back(g);
  const std::string page = RenderMetrics(in);
  const std::string l = R"({site="a",group="db1"})";
  EXPECT_THAT(page, HasSubstr("cairn_group_point_seq" + l + " 12\n"));
  EXPECT_THAT(page, HasSubstr("cairn_group_point_age_seconds" + l + " 4\n"));
  EXPECT_THAT(page, HasSubstr("cairn_group_lag_seconds" + l + " 1\n"));
  EXPECT_THAT(page, HasSubstr("cairn_group_waiting_members" + l + " 1\n"));
  EXPECT_THAT(page, HasSubstr("cairn_group_up" + l + " 0\n"));
}

// A GET over a real socket; the whole answer.
std::string Get(uint16_t port, const std::string& request) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  EXPECT_EQ(write(fd, request.data(), request.size()), ssize_t(request.size()));
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) out.append(buf, n);
  close(fd);
  return out;
}

TEST(Metrics, ServedOverHttp) {
  std::atomic<int> renders = 0;  // counted on the server's thread
  auto server = MetricsServer::Start("127.0.0.1", 0, [&] {
    ++renders;
    return RenderMetrics(Input());
  });
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  const uint16_t port = (*server)->port();
  const std::string ok = Get(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_THAT(ok, HasSubstr("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(ok, HasSubstr("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
  EXPECT_THAT(ok, HasSubstr("cairn_up{site=\"a\"} 1\n"));
  EXPECT_THAT(Get(port, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n"), HasSubstr(" 404 "));
  EXPECT_THAT(Get(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
              HasSubstr(" 405 "));
  EXPECT_EQ(renders, 1);
  EXPECT_EQ(MetricsServer::Start("127.0.0.1", port, [] { return std::string(); }).status().code(),
            Code::kUnavailable);  // the port is taken
}

}  // namespace
}  // namespace cairn
