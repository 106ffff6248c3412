#pragma once
// Blocking steward::fetch() keeps one io_context (one io_uring descriptor) per thread for the
// thread's later calls. Creating it once before any test runs keeps that descriptor out of the
// per-test fd accounting, which must then balance exactly.

#include <steward/fetch.hpp>

#include <boost/test/unit_test.hpp>

namespace steward::test {

struct blocking_fetch_warmup {
    blocking_fetch_warmup() {
        std::error_code ec;
        (void)steward::fetch(steward::share_id{}, ec);  // fails (invalid id) after creating the context
    }
};

}  // namespace steward::test

using steward_blocking_fetch_warmup = steward::test::blocking_fetch_warmup;
BOOST_TEST_GLOBAL_FIXTURE(steward_blocking_fetch_warmup);
