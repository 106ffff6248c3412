#pragma once
// Helpers of the sharer load and fault suites (issue 6): descriptor counts of another process,
// /dev/shm snapshots, memory shared with forked children without any descriptor (so the fd
// accounting stays exact), a run-size scale for sanitizer builds, and RLIMIT_NOFILE raising.

#include <boost/test/unit_test.hpp>

#include <dirent.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace steward::test {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool sanitized_build = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
inline constexpr bool sanitized_build = true;
#else
inline constexpr bool sanitized_build = false;
#endif
#else
inline constexpr bool sanitized_build = false;
#endif

/// The fraction of the full run size to use: STEWARD_LOAD_SCALE (a number in (0, 1]) when set,
/// else 1 in a plain build and @p sanitized_default under a sanitizer, whose instrumentation
/// makes every fetch several times slower. Tests print the scale they ran with.
inline double load_scale(double sanitized_default = 0.1) {
    if (const char* text = std::getenv("STEWARD_LOAD_SCALE"); text && *text) {
        char* end = nullptr;
        const double v = std::strtod(text, &end);
        if (end != text && v > 0 && v <= 1) return v;
        std::fprintf(stderr, "STEWARD_LOAD_SCALE=%s ignored (want a number in (0, 1])\n", text);
    }
    return sanitized_build ? sanitized_default : 1.0;
}

/// Open descriptors of process @p pid (entries of /proc/<pid>/fd); -1 if it cannot be read.
/// For this process use open_fd_count(), which leaves out the listing's own descriptor.
inline int fd_count_of(pid_t pid) {
    const std::string path = "/proc/" + std::to_string(pid) + "/fd";
    DIR* dir = ::opendir(path.c_str());
    if (!dir) return -1;
    int n = 0;
    while (auto* entry = ::readdir(dir))
        if (entry->d_name[0] != '.') ++n;
    ::closedir(dir);
    return n;
}

/// Names in /dev/shm now.
inline std::set<std::string> shm_entries() {
    std::set<std::string> names;
    DIR* dir = ::opendir("/dev/shm");
    if (!dir) return names;
    while (auto* entry = ::readdir(dir)) {
        const std::string name = entry->d_name;
        if (name != "." && name != "..") names.insert(name);
    }
    ::closedir(dir);
    return names;
}

/// Entries of /dev/shm that were not in @p before and are still there after a grace period
/// (CTest runs other test programs at the same time, which create and remove their own entries
/// meanwhile; a real leftover stays).
inline std::vector<std::string> shm_left_over(
    const std::set<std::string>& before, std::chrono::milliseconds grace = std::chrono::milliseconds(3000)) {
    const auto deadline = std::chrono::steady_clock::now() + grace;
    std::vector<std::string> added;
    for (;;) {
        added.clear();
        for (const std::string& name : shm_entries())
            if (!before.count(name)) added.push_back(name);
        if (added.empty() || std::chrono::steady_clock::now() >= deadline) return added;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
}

/// Checks (Boost.Test) that /dev/shm holds nothing new since @p before.
inline void check_shm_unchanged(const std::set<std::string>& before) {
    const std::vector<std::string> added = shm_left_over(before);
    std::string list;
    for (const auto& n : added) list += " " + n;
    BOOST_TEST(added.empty(), "/dev/shm gained:" << list);
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
inline rlim_t raise_nofile_limit() {
    rlimit lim{};
    if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return 0;
    if (lim.rlim_cur < lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        (void)::setrlimit(RLIMIT_NOFILE, &lim);
        (void)::getrlimit(RLIMIT_NOFILE, &lim);
    }
    return lim.rlim_cur;
}

/// An array of @p n trivially copyable T in an anonymous MAP_SHARED mapping: written by forked
/// children, read by the parent, with no descriptor (and no /dev/shm name) involved.
template <typename T>
class shared_array {
    static_assert(std::is_trivially_copyable_v<T>);

public:
    explicit shared_array(std::size_t n) : n_(n) {
        void* p = ::mmap(nullptr, bytes(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw std::bad_alloc();
        data_ = static_cast<T*>(p);
        for (std::size_t i = 0; i < n_; ++i) new (data_ + i) T{};
    }
    shared_array(const shared_array&) = delete;
    shared_array& operator=(const shared_array&) = delete;
    ~shared_array() { ::munmap(data_, bytes()); }

    T& operator[](std::size_t i) noexcept { return data_[i]; }
    const T& operator[](std::size_t i) const noexcept { return data_[i]; }
    [[nodiscard]] std::size_t size() const noexcept { return n_; }
    T* begin() noexcept { return data_; }
    T* end() noexcept { return data_ + n_; }

private:
    [[nodiscard]] std::size_t bytes() const noexcept { return std::max<std::size_t>(1, n_ * sizeof(T)); }
    std::size_t n_;
    T* data_ = nullptr;
};

/// Polls @p pred every few milliseconds until it holds or @p limit passes; returns its last value.
template <typename Pred>
bool wait_for_condition(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
        if (pred()) return true;
        if (std::chrono::steady_clock::now() >= deadline) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
}

/// Seconds since @p start, as a double (for the figures the tests print).
inline double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace steward::test
