#include "tracker/registry.hpp"

#include <cstring>
#include <stdexcept>

namespace steward::detail::tracking {
namespace {

__extension__ using uint128 = unsigned __int128;  // GCC and Clang; silences -Wpedantic

constexpr std::uint64_t empty_slot = 0;
constexpr std::uint64_t tombstone = 1;

}  // namespace

registry::registry() {
    table_.assign(1024, empty_slot);
}

std::uint64_t registry::hash(resource_type type, std::string_view name) noexcept {
    // Every message's name is hashed, and names are short: two overlapping 8-byte loads cover
    // names up to 16 bytes, longer ones take 16 bytes per step, each step one 64x64->128 multiply
    // folded to 64 bits.
    const auto fold = [](std::uint64_t a, std::uint64_t b) noexcept {
        const uint128 r = static_cast<uint128>(a) * b;
        return static_cast<std::uint64_t>(r) ^ static_cast<std::uint64_t>(r >> 64);
    };
    const auto load = [](const char* p) noexcept {
        std::uint64_t w;
        std::memcpy(&w, p, 8);
        return w;
    };
    constexpr std::uint64_t k0 = 0xa0761d6478bd642fULL, k1 = 0xe7037ed1a0b428dbULL,
                            k2 = 0x8ebc6af09c88c6e3ULL;
    const char* p = name.data();
    std::size_t n = name.size();
    std::uint64_t seed = k0 ^ (static_cast<std::uint64_t>(type) * k2) ^ n;
    std::uint64_t a = 0, b = 0;
    if (n > 16) {
        const char* const end = p + n;
        while (n > 16) {
            seed = fold(load(p) ^ k1, load(p + 8) ^ seed);
            p += 16;
            n -= 16;
        }
        // The last 1..16 bytes, read as the 16 bytes that end the name (overlapping what the
        // loop already took): never a byte past its end.
        a = load(end - 16);
        b = load(end - 8);
    } else if (n >= 8) {
        a = load(p);
        b = load(p + n - 8);
    } else if (n >= 4) {
        std::uint32_t x, y;
        std::memcpy(&x, p, 4);
        std::memcpy(&y, p + n - 4, 4);
        a = x;
        b = y;
    } else if (n > 0) {
        a = (std::uint64_t{static_cast<unsigned char>(p[0])} << 16) |
            (std::uint64_t{static_cast<unsigned char>(p[n >> 1])} << 8) |
            static_cast<unsigned char>(p[n - 1]);
    }
    return fold(a ^ k1, b ^ seed) ^ fold(seed, k2);
}

std::string_view registry::name(handle h) const noexcept {
    const entry& e = entry_at(h);
    return {arena_pages_[e.name_offset >> 16].get() + (e.name_offset & 0xffff), e.name_size};
}

std::size_t registry::find_slot(resource_type type, std::string_view name, std::uint64_t h) const noexcept {
    const std::size_t mask = table_.size() - 1;
    const std::uint64_t tag = h >> 32;
    for (std::size_t i = h & mask;; i = (i + 1) & mask) {
        const std::uint64_t slot = table_[i];
        if (slot == empty_slot) return i;
        if (slot != tombstone && (slot >> 32) == tag) {
            const handle candidate = static_cast<handle>((slot & 0xffffffffu) - 2);
            const entry& e = entry_at(candidate);
            if (e.type == static_cast<std::uint8_t>(type) && e.name_size == name.size() &&
                std::memcmp(this->name(candidate).data(), name.data(), name.size()) == 0)
                return i;
        }
    }
}

registry::handle registry::find(resource_type type, std::string_view name) const noexcept {
    const std::size_t i = find_slot(type, name, hash(type, name));
    const std::uint64_t slot = table_[i];
    return slot == empty_slot ? no_handle : static_cast<handle>((slot & 0xffffffffu) - 2);
}

void registry::grow_table(std::size_t capacity) {
    std::vector<std::uint64_t> old;
    old.swap(table_);
    table_.assign(capacity, empty_slot);
    tombstones_ = 0;
    const std::size_t mask = capacity - 1;
    for (const std::uint64_t slot : old) {
        if (slot == empty_slot || slot == tombstone) continue;
        const handle hd = static_cast<handle>((slot & 0xffffffffu) - 2);
        const std::uint64_t h = hash(type(hd), name(hd));
        std::size_t i = h & mask;
        while (table_[i] != empty_slot) i = (i + 1) & mask;
        table_[i] = slot;
    }
}

std::uint32_t registry::store_name(std::string_view name) {
    if (arena_used_ + name.size() > arena_page_size) {
        if (arena_pages_.size() >= 65536)
            throw std::length_error("steward tracker registry: name arena full");
        arena_pages_.push_back(std::make_unique_for_overwrite<char[]>(arena_page_size));
        arena_used_ = 0;
    }
    const auto offset = static_cast<std::uint32_t>(((arena_pages_.size() - 1) << 16) | arena_used_);
    std::memcpy(arena_pages_.back().get() + arena_used_, name.data(), name.size());
    arena_used_ += name.size();
    return offset;
}

std::pair<registry::handle, bool> registry::insert(resource_type type, std::string_view name) {
    if (name.size() > 0xffff) throw std::length_error("steward tracker registry: name too long");
    const std::uint64_t h = hash(type, name);
    std::size_t i = find_slot(type, name, h);
    if (table_[i] != empty_slot) return {static_cast<handle>((table_[i] & 0xffffffffu) - 2), false};
    // Keep the load (live + tombstones) at most 1/2 so probes stay short.
    if ((live_ + tombstones_ + 1) * 2 > table_.size()) {
        grow_table(live_ + 1 > table_.size() / 4 ? table_.size() * 2 : table_.size());
        i = find_slot(type, name, h);
    }
    if (entry_count_ == no_handle - 1) throw std::length_error("steward tracker registry: too many entries");
    if (entry_count_ % entries_per_page == 0 && entry_count_ / entries_per_page == entry_pages_.size())
        entry_pages_.push_back(std::make_unique_for_overwrite<entry[]>(entries_per_page));
    const handle hd = entry_count_++;
    entry& e = entry_at(hd);
    e.dev = 0;
    e.ino = 0;
    e.name_offset = store_name(name);
    e.name_size = static_cast<std::uint16_t>(name.size());
    e.type = static_cast<std::uint8_t>(type);
    e.live = 1;
    e.pending = 1;
    e.has_identity = 0;
    e.observed = 0;
    table_[i] = ((h >> 32) << 32) | (std::uint64_t{hd} + 2);
    ++live_;
    ++per_type_[static_cast<std::size_t>(type)];
    return {hd, true};
}

bool registry::erase(resource_type type, std::string_view name) noexcept {
    const std::size_t i = find_slot(type, name, hash(type, name));
    if (table_[i] == empty_slot) return false;
    entry& e = entry_at(static_cast<handle>((table_[i] & 0xffffffffu) - 2));
    e.live = 0;
    e.pending = 0;
    table_[i] = tombstone;
    ++tombstones_;
    --live_;
    --per_type_[static_cast<std::size_t>(type)];
    return true;
}

void registry::set_identity(handle h, const file_identity* id) noexcept {
    entry& e = entry_at(h);
    e.pending = 0;
    e.has_identity = id != nullptr;
    e.dev = id ? id->dev : 0;
    e.ino = id ? id->ino : 0;
}

std::optional<file_identity> registry::identity(handle h) const noexcept {
    const entry& e = entry_at(h);
    if (!e.has_identity) return std::nullopt;
    return file_identity{e.dev, e.ino};
}

bool registry::compact() {
    const std::size_t dead = entry_count_ - live_;
    if (dead <= live_ || dead < 4096) return false;
    std::vector<std::unique_ptr<entry[]>> old_entries;
    std::vector<std::unique_ptr<char[]>> old_arena;
    old_entries.swap(entry_pages_);
    old_arena.swap(arena_pages_);
    const handle old_count = entry_count_;
    entry_count_ = 0;
    arena_used_ = arena_page_size;
    live_ = 0;
    tombstones_ = 0;
    per_type_ = {};
    std::size_t capacity = 1024;
    while (capacity < 4 * (old_count - dead)) capacity *= 2;
    table_.assign(capacity, empty_slot);
    for (handle h = 0; h < old_count; ++h) {
        const entry& e = old_entries[h / entries_per_page][h % entries_per_page];
        if (!e.live) continue;
        const std::string_view n{old_arena[e.name_offset >> 16].get() + (e.name_offset & 0xffff),
                                 e.name_size};
        const auto [nh, fresh] = insert(static_cast<resource_type>(e.type), n);
        (void)fresh;
        entry& ne = entry_at(nh);
        ne.dev = e.dev;
        ne.ino = e.ino;
        ne.pending = e.pending;
        ne.has_identity = e.has_identity;
    }
    return true;
}

std::size_t registry::memory_bytes() const noexcept {
    return entry_pages_.size() * entries_per_page * sizeof(entry) + arena_pages_.size() * arena_page_size +
           table_.size() * sizeof(std::uint64_t) + entry_pages_.capacity() * sizeof(void*) +
           arena_pages_.capacity() * sizeof(void*);
}

}  // namespace steward::detail::tracking
