# Proves find_package(mp) works from an install prefix: installs this build into a scratch prefix,
# then configures, builds and runs a tiny consumer project against it.
# Inputs: MP_BINARY_DIR, MP_WORK_DIR, MP_CONSUMER_SRC, MP_BUILD_TYPE, MP_SANITIZE.
file(REMOVE_RECURSE "${MP_WORK_DIR}")

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc}):\n${out}\n${err}")
  endif()
  message(STATUS "${what}: ok")
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

run_step("install" ${CMAKE_COMMAND} --install "${MP_BINARY_DIR}" --prefix "${MP_WORK_DIR}/prefix")
set(flags "")
if(MP_SANITIZE)
  set(flags "-fsanitize=${MP_SANITIZE}")
endif()
run_step("configure consumer" ${CMAKE_COMMAND} -S "${MP_CONSUMER_SRC}/consumer" -B "${MP_WORK_DIR}/build"
         "-DCMAKE_PREFIX_PATH=${MP_WORK_DIR}/prefix" "-DCMAKE_BUILD_TYPE=${MP_BUILD_TYPE}"
         "-DCMAKE_CXX_FLAGS=${flags}" "-DCMAKE_EXE_LINKER_FLAGS=${flags}")
run_step("build consumer" ${CMAKE_COMMAND} --build "${MP_WORK_DIR}/build")
run_step("run consumer" "${MP_WORK_DIR}/build/consumer")
if(NOT last_output MATCHES "child exit code 42")
  message(FATAL_ERROR "consumer printed: ${last_output}")
endif()
file(REMOVE_RECURSE "${MP_WORK_DIR}")
