#define BOOST_TEST_MODULE cli_demo_test
#include "support/cli_process.hpp"
#include "support/test_support.hpp"

#include <algorithm>
#include <string>
#include <vector>

using namespace std::chrono_literals;

namespace {

std::vector<std::string> sorted_entries(const std::string& dir) {
    std::vector<std::string> names = steward::test::directory_entries(dir);
    std::sort(names.begin(), names.end());
    return names;
}

}  // namespace

BOOST_AUTO_TEST_CASE(demo_runs_every_chapter_and_leaves_nothing_behind,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    const int fds_before = steward::test::open_fd_count();
    {
        steward::test::runtime_dir dir;
        const std::vector<std::string> shm_before = sorted_entries("/dev/shm");

        steward::test::cli_process demo({"demo"}, dir.env());
        const auto r = demo.finish(60s);
        BOOST_TEST(r.status == 0, "demo failed:\n" << r.out << r.err);
        BOOST_TEST(r.out.find("FAILED") == std::string::npos, r.out);

        // The sharer chapter, step by step (its own assertions print FAILED and exit non-zero;
        // these check the story was actually told).
        const char* expected[] = {
            "the sharer: a memfd and a listening socket for a worker",
            "as ONE share:",
            "worker: received fd=",
            "type=memfd target=/memfd:steward-demo-notes",
            "type=socket target=socket:[",
            "worker: the memfd says \"notes in a memfd: 42 widgets, 7 gadgets\"",
            "worker: accepted a connection on the shared listener",
            "the worker answered: \"worker ",
            "fetching the same id again: refused: share not available",
            "its socket and directory are gone",
            "demo finished.",
        };
        for (const char* line : expected)
            BOOST_TEST(r.out.find(line) != std::string::npos, "missing: " << line);

        BOOST_TEST(dir.empty(), "the demo's sharer left its socket directory behind");
        const std::vector<std::string> shm_after = sorted_entries("/dev/shm");
        std::vector<std::string> added;
        std::set_difference(shm_after.begin(), shm_after.end(), shm_before.begin(), shm_before.end(),
                            std::back_inserter(added));
        // Only the demo's own objects (all named after its stem): tests running in parallel create
        // and remove theirs meanwhile.
        std::erase_if(
            added, [](const std::string& name) { return name.find("steward_demo_") == std::string::npos; });
        BOOST_TEST(added.empty(), "new /dev/shm entries after the demo: " << (added.empty() ? "" : added[0]));
    }
    BOOST_TEST(steward::test::open_fd_count() == fds_before);
}

BOOST_AUTO_TEST_CASE(demo_worker_rejects_bad_usage,
                     *boost::unit_test::precondition(steward::test::io_uring_available)) {
    const auto r = steward::test::run_cli({"__demo-sharer-worker"});
    BOOST_TEST(r.status == 64);
    BOOST_TEST(r.err.find("usage") != std::string::npos, r.err);
}
