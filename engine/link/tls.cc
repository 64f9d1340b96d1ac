#include "engine/link/tls.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

#include "engine/link/tls_impl.h"

namespace cairn {
namespace {

std::string OpenSslError() {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "no detail from OpenSSL";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

// Reads the first certificate of a PEM file, to name the file in errors
// before OpenSSL is handed it.
StatusOr<std::unique_ptr<X509, decltype(&X509_free)>> ReadCertificate(const std::string& path,
                                                                      std::string_view what) {
  std::unique_ptr<FILE, decltype(&std::fclose)> f(std::fopen(path.c_str(), "r"), &std::fclose);
  if (!f) {
    return InvalidArgument(
        fmt::format("[tls] {} = {}: cannot be read: {}", what, path, std::strerror(errno)));
  }
  X509* cert = PEM_read_X509(f.get(), nullptr, nullptr, nullptr);
  if (cert == nullptr) {
    return InvalidArgument(
        fmt::format("[tls] {} = {}: not a PEM certificate ({})", what, path, OpenSslError()));
  }
  return std::unique_ptr<X509, decltype(&X509_free)>(cert, &X509_free);
}

StatusOr<std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>> ReadKey(const std::string& path) {
  std::unique_ptr<FILE, decltype(&std::fclose)> f(std::fopen(path.c_str(), "r"), &std::fclose);
  if (!f) {
    return InvalidArgument(
        fmt::format("[tls] key = {}: cannot be read: {}", path, std::strerror(errno)));
  }
  EVP_PKEY* key = PEM_read_PrivateKey(f.get(), nullptr, nullptr, nullptr);
  if (key == nullptr) {
    return InvalidArgument(fmt::format("[tls] key = {}: not an unencrypted PEM private key ({})",
                                       path, OpenSslError()));
  }
  return std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>(key, &EVP_PKEY_free);
}

}  // namespace

std::vector<std::string> CertificateNames(X509* cert) {
  std::vector<std::string> names;
  const auto add = [&](std::string n) {
    if (!n.empty() && std::find(names.begin(), names.end(), n) == names.end()) {
      names.push_back(std::move(n));
    }
  };
  if (X509_NAME* subject = X509_get_subject_name(cert)) {
    const int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    if (i >= 0) {
      const ASN1_STRING* cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i));
      add(std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(cn)),
                      ASN1_STRING_length(cn)));
    }
  }
  auto* sans =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  for (int i = 0; sans != nullptr && i < sk_GENERAL_NAME_num(sans); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(sans, i);
    if (n->type == GEN_DNS) {
      add(std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(n->d.dNSName)),
                      ASN1_STRING_length(n->d.dNSName)));
    } else if (n->type == GEN_IPADD) {
      const unsigned char* ip = ASN1_STRING_get0_data(n->d.iPAddress);
      const int len = ASN1_STRING_length(n->d.iPAddress);
      char text[64] = {};
      if (len == 4) {
        add(fmt::format("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]));
      } else if (len == 16 && inet_ntop(AF_INET6, ip, text, sizeof text) != nullptr) {
        add(text);
      }
    }
  }
  GENERAL_NAMES_free(sans);
  return names;
}

TlsContext::TlsContext(std::unique_ptr<Impl> impl, std::vector<std::string> own_names)
    : impl_(std::move(impl)), own_names_(std::move(own_names)) {}

TlsContext::~TlsContext() = default;

StatusOr<std::shared_ptr<const TlsContext>> TlsContext::Load(const TlsFiles& files) {
  if (files.ca.empty() || files.cert.empty() || files.key.empty()) {
    return InvalidArgument(
        "[tls] needs ca, cert and key (or insecure = true for plaintext links, which anyone on "
        "the network can read and forge)");
  }
  RETURN_IF_ERROR(ReadCertificate(files.ca, "ca").status());
  ASSIGN_OR_RETURN(auto own, ReadCertificate(files.cert, "cert"));
  auto impl = std::make_unique<Impl>();
  SSL_CTX* ctx = impl->ctx.get();
  if (ctx == nullptr)
    return Internal(fmt::format("OpenSSL has no TLS context ({})", OpenSslError()));
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  // A peer that closes without TLS's close_notify (cairnd closes the
  // socket) ends the stream as one that sent it; a frame it cut short is
  // still a truncated frame.
  SSL_CTX_set_options(ctx,
                      SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (SSL_CTX_load_verify_locations(ctx, files.ca.c_str(), nullptr) != 1) {
    return InvalidArgument(
        fmt::format("[tls] ca = {}: cannot be loaded ({})", files.ca, OpenSslError()));
  }
  if (SSL_CTX_use_certificate_chain_file(ctx, files.cert.c_str()) != 1) {
    return InvalidArgument(
        fmt::format("[tls] cert = {}: cannot be loaded ({})", files.cert, OpenSslError()));
  }
  ASSIGN_OR_RETURN(auto key, ReadKey(files.key));
  if (X509_check_private_key(own.get(), key.get()) != 1) {
    ERR_clear_error();
    return InvalidArgument(
        fmt::format("[tls] key = {} does not belong to cert = {}", files.key, files.cert));
  }
  if (SSL_CTX_use_PrivateKey(ctx, key.get()) != 1) {
    return InvalidArgument(
        fmt::format("[tls] key = {}: cannot be used ({})", files.key, OpenSslError()));
  }
  // Both ends must present a certificate that chains to the CA.
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  std::vector<std::string> names = CertificateNames(own.get());
  return std::shared_ptr<const TlsContext>(new TlsContext(std::move(impl), std::move(names)));
}

}  // namespace cairn
