// What mutual TLS costs on the link between sites: one connection over
// loopback carries data records of 4 MiB (a full sync's) or 64 KiB (an
// incremental's small writes), each with a record header body, from a
// sender thread to a receiver thread, as plain TCP and as TLS 1.3 (AES-GCM; the
// certificates are made by deploy/cairn-certs). Reported: throughput, and
// the CPU seconds both ends spend per GiB (the process's user + system
// time over the run, not one thread's), so the two rows compare as a ratio
// in the same run.
//   build/bench/link_bench --benchmark_min_time=2
#include <benchmark/benchmark.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/link/tcp_link.h"
#include "engine/link/tls.h"

namespace cairn {
namespace {

constexpr size_t kBytesPerIteration = 64u << 20;

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
         u.ru_stime.tv_usec / 1e6;
}

// The CA and the two sites' certificates, made once.
const std::filesystem::path& Pki() {
  static const std::filesystem::path dir = [] {
    char tmpl[] = "/tmp/cairn-linkbench.XXXXXX";
    std::filesystem::path d = ::mkdtemp(tmpl);
    const std::string t = std::string(CAIRN_SOURCE_DIR) + "/deploy/cairn-certs";
    const std::string cmd = t + " ca " + d.string() + " >/dev/null && " + t + " cert " +
                            d.string() + " site-a IP:127.0.0.1 >/dev/null && " + t + " cert " +
                            d.string() + " site-b IP:127.0.0.1 >/dev/null";
    if (std::system(cmd.c_str()) != 0) std::abort();
    return d;
  }();
  return dir;
}

LinkOptions Options(bool tls, const std::string& site) {
  LinkOptions o;
  if (tls) {
    const auto d = Pki();
    auto ctx = TlsContext::Load(
        {(d / "ca.pem").string(), (d / (site + ".pem")).string(), (d / (site + ".key")).string()});
    if (!ctx.ok()) std::abort();
    o.tls = *ctx;
  }
  return o;
}

void BM_LinkThroughput(benchmark::State& state) {
  const bool tls = state.range(0) != 0;
  const size_t frame = static_cast<size_t>(state.range(1));
  const int frames_per_iteration = static_cast<int>(kBytesPerIteration / frame);
  auto listener = Listener::ListenTcp("127.0.0.1", 0, Options(tls, "site-b"));
  if (!listener.ok()) return state.SkipWithError(listener.status().ToString().c_str());
  std::unique_ptr<Link> server;
  std::thread acceptor([&] {
    auto l = (*listener)->Accept();
    if (l.ok() && (*l)->Handshake().ok()) server = std::move(*l);
  });
  auto client = ConnectTcp("127.0.0.1", (*listener)->port(), Options(tls, "site-a"));
  acceptor.join();
  if (!client.ok() || !server) return state.SkipWithError("no connection");

  std::mutex mu;
  std::condition_variable cv;
  int64_t received = 0;
  std::thread receiver([&] {
    while (true) {
      auto f = server->Receive(std::chrono::seconds(30));
      if (!f.ok()) return;
      std::lock_guard lock(mu);
      ++received;
      cv.notify_all();
    }
  });
  const std::vector<char> payload(frame, 'x');
  const std::string body(48, 'b');  // about a RecordHeader's size
  int64_t sent = 0;
  const double cpu0 = CpuSeconds();
  for (auto _ : state) {
    for (int i = 0; i < frames_per_iteration; ++i) {
      if (!(*client)->Send(FrameType::kRecord, body, payload).ok()) {
        state.SkipWithError("send failed");
        break;
      }
    }
    sent += frames_per_iteration;
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return received >= sent; });
  }
  const double cpu = CpuSeconds() - cpu0;
  (*client)->Close();
  client->reset();
  receiver.join();
  const double gib = static_cast<double>(sent) * frame / (1u << 30);
  state.SetBytesProcessed(sent * static_cast<int64_t>(frame));
  state.counters["cpu_s_per_GiB"] = gib > 0 ? cpu / gib : 0;
  state.SetLabel(tls ? "mutual TLS 1.3" : "plain TCP");
}
BENCHMARK(BM_LinkThroughput)
    ->ArgsProduct({{0, 1}, {4 << 20, 64 << 10}})
    ->ArgNames({"tls", "frame"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace cairn

BENCHMARK_MAIN();
