include(${CMAKE_CURRENT_LIST_DIR}/StewardAsio.cmake)
find_package(OpenSSL 1.1 REQUIRED COMPONENTS Crypto)
