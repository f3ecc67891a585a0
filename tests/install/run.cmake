# Proves an installed mp is usable as a user would use it: installs this build into a scratch
# prefix, then
#   1. find_package(mp) with MPI made unfindable (CMAKE_DISABLE_FIND_PACKAGE_MPI): mp::mp alone
#      must configure, build and run where MPI is absent;
#   2. find_package(mp COMPONENTS mpi) builds a program on mp::mpi (when this build has MPI);
#   3. pkg-config --cflags --libs mp builds and runs the same program without CMake;
#   4. the licence is installed;
# and that the plain program neither links nor maps libcrypto (mp loads it at the first handshake).
# Inputs: MP_BINARY_DIR, MP_WORK_DIR, MP_CONSUMER_SRC, MP_BUILD_TYPE, MP_SANITIZE, MP_HAVE_MPI,
#         MP_CXX (the compiler this build used).
file(REMOVE_RECURSE "${MP_WORK_DIR}")

include(${CMAKE_CURRENT_LIST_DIR}/common.cmake)

set(prefix "${MP_WORK_DIR}/prefix")
run_step("install" ${CMAKE_COMMAND} --install "${MP_BINARY_DIR}" --prefix "${prefix}")
# A shared build (BUILD_SHARED_LIBS=ON): libmp.so carries its SOVERSION, and programs built
# without an rpath (the pkg-config one) find it through LD_LIBRARY_PATH.
file(GLOB libmp_so "${prefix}/lib*/libmp.so" "${prefix}/lib/*/libmp.so")
find_program(READELF readelf REQUIRED)
if(libmp_so)
  run_step("readelf libmp.so" ${READELF} -d ${libmp_so})
  if(NOT last_output MATCHES "SONAME[^\n]*libmp\\.so\\.[0-9]+\\.[0-9]+\\]")
    message(FATAL_ERROR "libmp.so has no major.minor SONAME:\n${last_output}")
  endif()
  get_filename_component(libdir "${libmp_so}" DIRECTORY)
  set(ENV{LD_LIBRARY_PATH} "${libdir}")
endif()
set(flags "")
if(MP_SANITIZE)
  set(flags "-fsanitize=${MP_SANITIZE}")
endif()

# 1. mp::mp where MPI cannot be found.
run_step("configure consumer (no MPI)" ${CMAKE_COMMAND} -S "${MP_CONSUMER_SRC}/consumer"
         -B "${MP_WORK_DIR}/build" "-DCMAKE_PREFIX_PATH=${prefix}" "-DCMAKE_BUILD_TYPE=${MP_BUILD_TYPE}"
         "-DCMAKE_CXX_COMPILER=${MP_CXX}" -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON
         "-DCMAKE_CXX_FLAGS=${flags}" "-DCMAKE_EXE_LINKER_FLAGS=${flags}")
run_step("build consumer" ${CMAKE_COMMAND} --build "${MP_WORK_DIR}/build")
run_step("run consumer" "${MP_WORK_DIR}/build/consumer")
if(NOT last_output MATCHES "child exit code 42" OR NOT last_output MATCHES "spawn child exit code 43")
  message(FATAL_ERROR "consumer printed: ${last_output}")
endif()
# A program that only starts processes must not load libcrypto: not linked (DT_NEEDED of the
# program and of libmp.so when shared), not mapped while it runs.
if(NOT last_output MATCHES "libcrypto not mapped")
  message(FATAL_ERROR "a Process-only program has libcrypto mapped:\n${last_output}")
endif()
foreach(elf "${MP_WORK_DIR}/build/consumer" ${libmp_so})
  run_step("readelf -d ${elf}" ${READELF} -d "${elf}")
  if(last_output MATCHES "NEEDED[^\n]*libcrypto")
    message(FATAL_ERROR "${elf} needs libcrypto:\n${last_output}")
  endif()
endforeach()

# mp inside shared libraries (consumer/plugin*.cpp): no `main` to wrap or resolve in them.
run_step("run plugin_app" "${MP_WORK_DIR}/build/plugin_app")
if(NOT last_output MATCHES "plugin fork 44 spawn 45")
  message(FATAL_ERROR "plugin_app printed: ${last_output}")
endif()
file(GLOB plugin_module "${MP_WORK_DIR}/build/*mp_plugin_private*")
run_step("dlopen the plugin" "${MP_WORK_DIR}/build/plugin_host" "${plugin_module}")
if(NOT last_output MATCHES "host fork 46")
  message(FATAL_ERROR "plugin_host printed: ${last_output}")
endif()

# 2. the mpi component.
if(MP_HAVE_MPI)
  run_step("configure consumer (COMPONENTS mpi)" ${CMAKE_COMMAND} -S "${MP_CONSUMER_SRC}/consumer"
           -B "${MP_WORK_DIR}/build-mpi" "-DCMAKE_PREFIX_PATH=${prefix}"
           "-DCMAKE_BUILD_TYPE=${MP_BUILD_TYPE}" "-DCMAKE_CXX_COMPILER=${MP_CXX}" -DMP_CONSUMER_MPI=ON
           "-DCMAKE_CXX_FLAGS=${flags}" "-DCMAKE_EXE_LINKER_FLAGS=${flags}")
  run_step("build consumer (mp::mpi)" ${CMAKE_COMMAND} --build "${MP_WORK_DIR}/build-mpi")
endif()

# 3. pkg-config, as a Makefile user would: c++ main.cpp $(pkg-config --cflags --libs mp).
find_program(PKG_CONFIG pkg-config REQUIRED)
file(GLOB pc_dirs "${prefix}/lib*/pkgconfig" "${prefix}/lib/*/pkgconfig")
set(ENV{PKG_CONFIG_PATH} "${pc_dirs}")
run_step("pkg-config mp" ${PKG_CONFIG} --cflags --libs mp)
string(STRIP "${last_output}" pc_flags)
separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
separate_arguments(san_flags UNIX_COMMAND "${flags}")
run_step("build with pkg-config" "${MP_CXX}" -std=c++20 ${san_flags}
         "${MP_CONSUMER_SRC}/consumer/main.cpp" -o "${MP_WORK_DIR}/pc_consumer" ${pc_flags})
run_step("run the pkg-config build" "${MP_WORK_DIR}/pc_consumer")
if(NOT last_output MATCHES "child exit code 42" OR NOT last_output MATCHES "spawn child exit code 43")
  message(FATAL_ERROR "pkg-config consumer printed: ${last_output}")
endif()
if(MP_HAVE_MPI)
  run_step("pkg-config mp-mpi" ${PKG_CONFIG} --cflags --libs mp-mpi)
  string(STRIP "${last_output}" pc_mpi_flags)
  separate_arguments(pc_mpi_flags UNIX_COMMAND "${pc_mpi_flags}")
  run_step("build with pkg-config (mp-mpi)" "${MP_CXX}" -std=c++20 ${san_flags}
           "${MP_CONSUMER_SRC}/consumer/mpi_main.cpp" -o "${MP_WORK_DIR}/pc_mpi_consumer" ${pc_mpi_flags})
endif()

# 4. the licence, beside the documentation.
file(GLOB licence "${prefix}/share/doc/mp/LICENSE")
if(NOT licence)
  message(FATAL_ERROR "LICENSE is not installed in share/doc/mp")
endif()
file(REMOVE_RECURSE "${MP_WORK_DIR}")
