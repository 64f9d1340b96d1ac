// MetricsServer (metrics_http.h) on Boost.Beast: the only translation unit
// that includes Beast.
#include "engine/daemon/metrics_http.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <exception>
#include <string>
#include <thread>

namespace cairn {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

constexpr auto kRequestTimeout = std::chrono::seconds(10);

// One connection: one request read, one response written, closed.
class Exchange : public std::enable_shared_from_this<Exchange> {
 public:
  Exchange(tcp::socket socket, const MetricsServer::Render& render)
      : stream_(std::move(socket)), render_(render) {}

  void Run() {
    stream_.expires_after(kRequestTimeout);
    http::async_read(stream_, buffer_, request_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       if (!ec) self->Answer();
                     });
  }

 private:
  void Answer() {
    const std::string_view target = request_.target();
    const bool metrics = target == "/metrics" || target.starts_with("/metrics?");
    const bool get = request_.method() == http::verb::get || request_.method() == http::verb::head;
    response_.version(request_.version());
    response_.keep_alive(false);
    response_.set(http::field::server, "cairnd");
    std::string page;
    std::string failed;
    if (metrics && get) {
      try {  // a page that cannot be made is an error of this request, not of cairnd
        page = render_();
      } catch (const std::exception& e) {
        failed = e.what();
      }
    }
    if (metrics && get && failed.empty()) {
      response_.result(http::status::ok);
      response_.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      response_.body() = std::move(page);
    } else if (!failed.empty()) {
      spdlog::warn("metrics: the page could not be made: {}", failed);
      response_.result(http::status::internal_server_error);
      response_.set(http::field::content_type, "text/plain; charset=utf-8");
      response_.body() = "cairnd could not make its metrics: " + failed + "\n";
    } else {
      response_.result(get ? http::status::not_found : http::status::method_not_allowed);
      response_.set(http::field::content_type, "text/plain; charset=utf-8");
      response_.body() = "cairnd serves GET /metrics only\n";
    }
    response_.prepare_payload();
    stream_.expires_after(kRequestTimeout);
    http::async_write(stream_, response_, [self = shared_from_this()](beast::error_code, size_t) {
      beast::error_code ignored;
      self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> request_;
  http::response<http::string_body> response_;
  const MetricsServer::Render& render_;
};

}  // namespace

struct MetricsServer::Impl {
  net::io_context io{1};
  tcp::acceptor acceptor{io};
  Render render;
  std::thread thread;

  void Accept() {
    acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
      if (ec == net::error::operation_aborted) return;
      if (!ec) std::make_shared<Exchange>(std::move(socket), render)->Run();
      Accept();
    });
  }
};

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& host,
                                                              uint16_t port, Render render) {
  auto impl = std::make_unique<Impl>();
  impl->render = std::move(render);
  beast::error_code ec;
  const auto address = net::ip::make_address(host, ec);
  if (ec) return InvalidArgument(fmt::format("metrics_listen: '{}' is not an address", host));
  const tcp::endpoint at(address, port);
  impl->acceptor.open(at.protocol(), ec);
  if (!ec) impl->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(at, ec);
  if (!ec) impl->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    return Unavailable(
        fmt::format("metrics_listen {}:{} cannot be listened on: {}", host, port, ec.message()));
  }
  impl->Accept();
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->io.run(); });
  return std::unique_ptr<MetricsServer>(new MetricsServer(std::move(impl)));
}

MetricsServer::~MetricsServer() {
  net::post(impl_->io, [impl = impl_.get()] {
    beast::error_code ignored;
    impl->acceptor.close(ignored);
    impl->io.stop();
  });
  impl_->thread.join();
}

uint16_t MetricsServer::port() const { return impl_->acceptor.local_endpoint().port(); }

}  // namespace cairn
