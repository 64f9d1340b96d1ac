// Certificates for the TLS tests, made once per test binary by the same
// tool an operator uses (deploy/cairn-certs): a CA with site-a and site-b
// (both naming 127.0.0.1 and localhost), and a second CA with its own
// site-a, whom the first CA's peers must not trust.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "engine/link/tls.h"

#ifndef CAIRN_SOURCE_DIR
#error "CAIRN_SOURCE_DIR must name the source tree (tests/CMakeLists.txt)"
#endif

namespace cairn::testing {

class TestCerts {
 public:
  static const TestCerts& Get() {
    static const TestCerts certs;
    return certs;
  }
  // `name` of the first CA ("site-a", "site-b"), or of the other ("other/site-a").
  TlsFiles Files(const std::string& name) const {
    const bool other = name.rfind("other/", 0) == 0;
    const std::filesystem::path d = other ? dir_ / "other" : dir_ / "main";
    const std::string n = other ? name.substr(6) : name;
    return {(d / "ca.pem").string(), (d / (n + ".pem")).string(), (d / (n + ".key")).string()};
  }
  std::shared_ptr<const TlsContext> Context(const std::string& name) const {
    auto ctx = TlsContext::Load(Files(name));
    EXPECT_TRUE(ctx.ok()) << ctx.status().ToString();
    return ctx.ok() ? *ctx : nullptr;
  }
  const std::filesystem::path& dir() const { return dir_; }

 private:
  TestCerts() {
    char tmpl[] = "/tmp/cairn-certs.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    const std::string tool = std::string(CAIRN_SOURCE_DIR) + "/deploy/cairn-certs";
    const std::string cmd =
        "set -e; t=" + tool + "; d=" + dir_.string() +
        "; $t ca $d/main; $t cert $d/main site-a IP:127.0.0.1 DNS:localhost;"
        " $t cert $d/main site-b IP:127.0.0.1 DNS:localhost; $t ca $d/other --name Other;"
        " $t cert $d/other site-a IP:127.0.0.1 DNS:localhost >/dev/null";
    const int rc = std::system(("bash -c '" + cmd + "' >/dev/null").c_str());
    if (rc != 0) ADD_FAILURE() << "deploy/cairn-certs failed (" << rc << "): is openssl installed?";
  }
  ~TestCerts() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::filesystem::path dir_;
};

}  // namespace cairn::testing
