// MetricsServer: GET /metrics over HTTP/1.1 (Boost.Beast), for Prometheus
// to scrape. One thread; each connection is answered once and closed, and
// one that does not send its request within 10 s is dropped. The page is
// what `render` returns, made when asked.
//
// Thread-safety: Start and the destructor from one thread; `render` runs
// on the server's thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "engine/base/status.h"

namespace cairn {

class MetricsServer {
 public:
  using Render = std::function<std::string()>;
  // Listens on host:port (port 0: any free one, see port()).
  static StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& host, uint16_t port,
                                                        Render render);
  ~MetricsServer();  // stops serving
  uint16_t port() const;

  struct Impl;

 private:
  explicit MetricsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cairn
