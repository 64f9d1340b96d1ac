// The KvStore conformance suite over MemoryKvStore.
#include "engine/catalog/kv_store.h"

#include "tests/unit/catalog/kv_store_conformance.h"

namespace cairn {
namespace {

INSTANTIATE_TEST_SUITE_P(Memory, KvStoreConformanceTest,
                         ::testing::Values(KvStoreConformanceParam{
                             "MemoryKvStore",
                             []() -> StatusOr<KvStoreTarget> {
                               return KvStoreTarget{std::make_unique<MemoryKvStore>(), nullptr};
                             }}),
                         KvStoreParamName);

}  // namespace
}  // namespace cairn
