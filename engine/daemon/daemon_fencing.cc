// Daemon: fencing the sink instance that ran before this one (daemon.h,
// docs/OPERATIONS.md "Fencing"), and watching that no newer one fenced it.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>

#include "engine/base/clock.h"
#include "engine/ceph/rados_sink_lock.h"
#include "engine/daemon/daemon.h"

namespace cairn {
namespace {

// A client address nobody has (TEST-NET-1, RFC 5737): blocklisting it for a
// second shows that this user may blocklist, before a crash needs it.
constexpr char kProbeAddr[] = "192.0.2.1:0/1";

std::string HostName() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "";
  return buf;
}

std::string BootId() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(f, id);
  return id;
}

// True if `prev` (a sink instance recorded in a catalog) is certainly not
// running any more: it ran on this host, and the host rebooted since, or
// its pid is gone or is now another program (or this process). Only decides
// how loudly a fence is logged.
bool CertainlyGone(const SinkInstance& prev, const SinkInstance& self) {
  if (prev.host.empty() || prev.host != self.host) return false;
  if (!prev.boot_id.empty() && !self.boot_id.empty() && prev.boot_id != self.boot_id) return true;
  if (prev.pid <= 0) return false;
  if (prev.pid == self.pid) return true;
  if (kill(static_cast<pid_t>(prev.pid), 0) != 0 && errno == ESRCH) return true;
  std::ifstream comm(fmt::format("/proc/{}/comm", prev.pid));
  std::string name;
  return std::getline(comm, name) && name != "cairnd";
}

}  // namespace

Status Daemon::FencePreviousSink() {
  const SinkConfig& sc = *config_.sink;
  ASSIGN_OR_RETURN(std::string addr, cluster_->ClientAddress());
  SinkInstance self;
  self.addr = addr;
  self.site = config_.site;
  self.host = HostName();
  self.pid = getpid();
  self.boot_id = BootId();
  self.started_ns = RealClock().UnixNs();
  std::vector<std::shared_ptr<KvStore>> stores;
  std::vector<SinkCatalog> catalogs;
  for (const auto& pool : sc.pools) {
    ASSIGN_OR_RETURN(auto kv, OpenCatalog(pool));
    ASSIGN_OR_RETURN(auto io, cluster_->OpenIoCtx(pool));
    ASSIGN_OR_RETURN(auto lock, RadosSinkLock::Open(std::move(io), kCatalogObject,
                                                    fmt::format("cairnd pid {} on host {}, site {}",
                                                                self.pid, self.host, self.site)));
    catalogs.push_back({pool, kv.get(), lock.get()});
    stores.push_back(std::move(kv));
    sink_locks_[pool] = std::move(lock);
  }
  const auto t0 = RealClock().Now();
  auto fenced = FenceAndRegisterSink(catalogs, self, [this](const SinkInstance& prev) {
    return cluster_->Blocklist(prev.addr, kFenceExpire);
  });
  if (!fenced.ok()) return fenced.status();
  for (const std::string& w : fenced->warnings) spdlog::warn("sink: {}", w);
  const double ms = RealClock().SecondsSince(t0) * 1000;
  for (const FencedSink& f : fenced->fenced) {
    if (CertainlyGone(f.instance, self)) {
      spdlog::info(
          "sink: fenced the previous sink instance {} of pool(s) {} ({:.0f} ms): it no longer "
          "runs; its watches and locks on the standby images are gone, its I/O refused for {} s",
          DescribeSinkInstance(f.instance), fmt::join(f.pools, ", "), ms, kFenceExpire.count());
    } else {
      spdlog::warn(
          "sink: fenced the previous sink instance {} of pool(s) {} ({:.0f} ms): its watches and "
          "locks on the standby images are gone, its I/O refused for {} s; if it still runs, it "
          "stops (one sink per pool: this one takes over)",
          DescribeSinkInstance(f.instance), fmt::join(f.pools, ", "), ms, kFenceExpire.count());
    }
  }
  if (fenced->fenced.empty()) {
    // Nothing to fence (a first start): check now that this user may, so
    // that a missing cap shows today rather than after a crash.
    if (Status st = cluster_->Blocklist(kProbeAddr, std::chrono::seconds(1)); !st.ok()) {
      return st.Annotate(fmt::format(
          "checking that this sink could fence a crashed one (blocklisting {}, an address no "
          "client has, for 1 s)",
          kProbeAddr));
    }
  }
  sink_instance_ = self;
  spdlog::info("sink: registered as sink instance {} in pool(s) {}", self.addr,
               fmt::join(sc.pools, ", "));
  return OkStatus();
}

std::string Daemon::FencedBy() {
  for (const auto& [pool, lock] : sink_locks_) {
    auto holders = lock->Holders();
    if (holders.ok()) {
      if (std::none_of(holders->begin(), holders->end(),
                       [&](const SinkLockHolder& h) { return h.addr == sink_instance_.addr; })) {
        std::string by = "nobody holds it now";
        if (!holders->empty()) {
          SinkInstance who;
          who.addr = holders->front().addr;
          auto kv = OpenCatalog(pool);
          auto rec = kv.ok() ? Catalog(**kv).SinkInstanceRecord() : kv.status();
          if (rec.ok() && *rec && (*rec)->instance.addr == who.addr) who = (*rec)->instance;
          by = "sink instance " + DescribeSinkInstance(who) + " holds it now";
        }
        return fmt::format("the sink lock of pool {} was taken from this sink ({}): {}", pool,
                           sink_instance_.addr, by);
      }
      continue;
    }
    auto blocklisted = cluster_->Blocklisted(pool, kCatalogObject);
    if (blocklisted.ok() && *blocklisted) {
      return fmt::format(
          "this sink ({}) was blocklisted by another client (the sink lock of pool {} "
          "answers: {})",
          sink_instance_.addr, pool, holders.status().ToString());
    }
  }
  return "";
}

void Daemon::ReleaseSinkLocks() {
  for (const auto& [pool, lock] : sink_locks_) {
    if (Status st = lock->Release(); !st.ok()) {
      spdlog::warn("sink: giving up the sink lock of pool {}: {} (the next sink fences this one)",
                   pool, st.ToString());
    }
  }
  sink_locks_.clear();
}

void Daemon::WatchFencing() {
  std::unique_lock lock(fence_mu_);
  Clock& clock = RealClock();
  while (!clock.WaitUntil(lock, fence_cv_, clock.Now() + kFenceCheckPeriod,
                          [&] { return fence_stop_; })) {
    lock.unlock();
    const std::string why = FencedBy();
    lock.lock();
    if (!why.empty() && !fence_stop_) {
      spdlog::error("sink: {}; stopping this cairnd", why);
      kill(getpid(), SIGTERM);  // cairnd_main stops the daemon as on any SIGTERM
      return;
    }
  }
}

}  // namespace cairn
