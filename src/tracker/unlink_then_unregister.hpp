#pragma once
// The removal order shared by steward::shared_memory and steward::named_semaphore: remove the
// object FIRST, then unregister it. A kill -9 between the two leaves a registration of a name that
// no longer exists (the daemon reports and ignores it), never an object nobody will remove.

#include <steward/error.hpp>
#include <steward/resource_type.hpp>
#include <steward/tracker.hpp>

#include <cerrno>
#include <string>
#include <system_error>

namespace steward::detail {

/// Removes @p name with @p remove (shm_unlink or sem_unlink), then, when @p registered_with is
/// set, unregisters it there and clears it. @p ec receives the first error of the two.
inline void unlink_then_unregister(const std::string& name, resource_type type, int (*remove)(const char*),
                                   tracker*& registered_with, std::error_code& ec) {
    ec.clear();
    if (name.empty()) {
        ec = std::make_error_code(std::errc::invalid_argument);
        return;
    }
    if (remove(name.c_str()) != 0) ec = errno_code(errno);
    if (registered_with) {
        std::error_code uec;
        registered_with->unregister_resource(name, type, uec);
        registered_with = nullptr;
        if (!ec) ec = uec;
    }
}

}  // namespace steward::detail
